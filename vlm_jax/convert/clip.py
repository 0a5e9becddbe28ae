"""CLIP vision towers (HF `CLIPVisionModel`, or the vision half of `CLIPModel`) <->
`vlm_jax.nn.vit.ViT(class_token=True, pre_norm=True, patch_bias=False,
mlp_activation='quick_gelu', norm_epsilon=1e-5)`.

    embeddings.patch_embedding.weight [D, C, p, p]    patch_embedding/kernel [p, p, C, D]
    embeddings.class_embedding [D]                    cls
    embeddings.position_embedding.weight [1+hw, D]    pos_embedding/pos_embedding
    pre_layrnorm (sic)                                pre_norm/{scale,bias}
    encoder.layers.{i}.layer_norm1 / layer_norm2      <stack>/pre_attention_norm, pre_mlp_norm
    encoder.layers.{i}.self_attn.{q,k,v}_proj         <stack>/self_attention/{query,key,value}
    encoder.layers.{i}.self_attn.out_proj             <stack>/self_attention/out
    encoder.layers.{i}.mlp.fc1 / fc2                  <stack>/mlp/wi / wo
    post_layernorm                                    encoder_norm/{scale,bias}

HF names carry a `vision_model.` prefix in CLIPModel checkpoints (and in CLIPVisionModel ones
saved by transformers 4.x); both are read. HF applies `post_layernorm` to the pooled class
token only, our ViT to every token: our output equals `post_layernorm(last_hidden_state)`.
The text tower, projections and logit scale of a full CLIP checkpoint are ignored on purpose.
Position embeddings are imported at the checkpoint's grid (a different image size is a shape
mismatch error; `embeddings.resize_2d_pos_embedding` can adapt them afterwards).
"""
import jax.numpy as jnp

from vlm_jax.convert import rules as R
from vlm_jax.convert.checkpoint import ConversionError
from vlm_jax.nn import vit

NAME = "clip"
MODEL_TYPES = ("clip", "clip_vision_model")
IGNORE = (r"text_model\..*", r"text_projection\..*", r"visual_projection\..*", r"logit_scale",
          r"(vision_model\.)?embeddings\.position_ids")
PREFIX = "vision_model."


def _norm(ours, hf):
  return [R.copy(f"{ours}/scale", f"{hf}.weight"), R.copy(f"{ours}/bias", f"{hf}.bias")]


def _dense(ours, hf, in_axes=1):
  return [R.dense(f"{ours}/kernel", f"{hf}.weight", in_axes), R.vector(f"{ours}/bias", f"{hf}.bias")]


LAYER = [
    *_norm("pre_attention_norm", "encoder.layers.{i}.layer_norm1"),
    *_dense("self_attention/query", "encoder.layers.{i}.self_attn.q_proj"),
    *_dense("self_attention/key", "encoder.layers.{i}.self_attn.k_proj"),
    *_dense("self_attention/value", "encoder.layers.{i}.self_attn.v_proj"),
    *_dense("self_attention/out", "encoder.layers.{i}.self_attn.out_proj", in_axes=2),
    *_norm("pre_mlp_norm", "encoder.layers.{i}.layer_norm2"),
    *_dense("mlp/wi", "encoder.layers.{i}.mlp.fc1"),
    *_dense("mlp/wo", "encoder.layers.{i}.mlp.fc2"),
]


def slots(paths: dict, names: set | None) -> list[R.Slot]:
  """`paths`: our leaf paths -> shapes; `names`: the checkpoint's tensors (None: export)."""
  plain = [R.conv("patch_embedding/kernel", "embeddings.patch_embedding.weight"),
           R.copy("cls", "embeddings.class_embedding"),
           R.copy("pos_embedding/pos_embedding", "embeddings.position_embedding.weight"),
           *_norm("pre_norm", "pre_layrnorm"), *_norm("encoder_norm", "post_layernorm")]
  prefix = PREFIX if names and any(n.startswith(PREFIX) for n in names) else ""
  return R.expand(paths, R.prefixed(plain, prefix), [("encoder", R.prefixed(LAYER, prefix))])


def vision_config(config: dict) -> dict:
  return config.get("vision_config") or config


def module_kwargs(config: dict) -> dict:
  """`ViT` hyperparameters from a CLIPVisionConfig (or CLIPConfig's vision_config)."""
  c = vision_config(config)
  act = c.get("hidden_act", "quick_gelu")
  if act not in ("quick_gelu", "gelu"):
    raise ConversionError(f"{NAME}: hidden_act={act!r}; only quick_gelu and gelu are supported.")
  return dict(patch_size=c["patch_size"], width=c["hidden_size"],
              depth=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
              mlp_dim=c["intermediate_size"], mlp_activation=act, class_token=True,
              pre_norm=True, patch_bias=False, norm_epsilon=c.get("layer_norm_eps", 1e-5))


def build(config: dict, **overrides):
  """(ViT, example call args) from config.json; `overrides` set other fields."""
  c = vision_config(config)
  size, channels = c.get("image_size", 224), c.get("num_channels", 3)
  module = vit.ViT(**{**module_kwargs(config), **overrides})
  return module, (jnp.zeros((1, size, size, channels), jnp.float32),)


def hf_config(module, shapes: dict) -> dict:
  """config.json (CLIPVisionModel) for a CLIP-shaped ViT; the image size is read from the
  position embedding's grid."""
  layout = dict(class_token=True, pre_norm=True, patch_bias=False)
  wrong = {k: getattr(module, k) for k, v in layout.items() if getattr(module, k) != v}
  if wrong or module.mlp_activation not in ("quick_gelu", "gelu"):
    raise ConversionError(f"this ViT is not CLIP-shaped ({wrong}, mlp_activation="
                          f"{module.mlp_activation!r}; CLIP needs {layout}).")
  grid = round((shapes["pos_embedding/pos_embedding"][0] - 1) ** 0.5)
  return {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model",
          "hidden_size": module.width, "intermediate_size": module.mlp_dim,
          "num_hidden_layers": module.depth, "num_attention_heads": module.num_heads,
          "patch_size": module.patch_size, "image_size": grid * module.patch_size,
          "num_channels": shapes["patch_embedding/kernel"][2],
          "hidden_act": module.mlp_activation, "layer_norm_eps": module.norm_epsilon}
