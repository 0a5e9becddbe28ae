"""CogAgent's HF release (huggingface.co/THUDM/cogagent-chat-hf, also cogagent-vqa-hf: the
safetensors shards + config.json of `CogAgentForCausalLM`, modeling_cogagent.py) <->
`vlm_jax.models.cogagent.CogAgent`. One source, `checkpoint` (the directory):

    model.embed_tokens.weight                                   lm/embed/embedding
    model.layers.{i}.input_layernorm.weight                     lm/<stack>/pre_attention_norm
    model.layers.{i}.self_attn.language_expert_query_key_value  lm/<stack>/self_attention/
        [3D, D] rows [q; k; v]                                    {query,key,value}
    model.layers.{i}.self_attn.vision_expert_query_key_value    .../vision_{query,key,value}
    model.layers.{i}.self_attn.{language,vision}_expert_dense   .../{out,vision_out}
    model.layers.{i}.post_cross_attention_layernorm.weight      .../pre_cross_attention_norm
    model.layers.{i}.cross_attn.query / key_value ([k; v]) / dense
                                                                .../cross_attention/{query,key,
                                                                value,out} (heads = the LM's)
    model.layers.{i}.post_attention_layernorm.weight            .../pre_mlp_norm
    model.layers.{i}.mlp.{language,vision}_mlp.{gate,up,down}_proj
                                                  .../{mlp,vision_mlp}/{wi,wi_gate,wo}
    model.norm.weight, lm_head.weight                           lm/final_norm, logits_projection
    model.vision.linear_proj.{linear_proj, norm1, gate_proj, dense_h_to_4h, dense_4h_to_h}
                                                                adapter/{linear_proj, norm,
                                                                glu/wi, glu/wi_gate, glu/wo}
    model.vision.boi / eoi [1, 1, D]                            adapter/boi / eoi
    model.layers.{i}.self_attn.rotary_emb.inv_freq (a buffer)   ignored; written on export

Not imported: the two vision towers. The low-res EVA2-CLIP-E
(`model.vision.patch_embedding.*`, `model.vision.transformer.layers.{i}.*`, visual.py)
normalises each branch's output
(x + LN(Attn(x))), and the high-res EVA-02-L (`model.cross_vision.*`, cross_visual.py) has
rotary positions, SwiGLU with sub-LayerNorms and q/v-only biases, while our `vision` and
`high_res` are pre-LN ViTs (models/cogagent.py): their tensors are ignored, our towers keep
their initialisation, and the import log says so. The LM, the cross-attention, the
adapter and boi/eoi import exactly.
"""
import jax.numpy as jnp
import numpy as np

from vlm_jax.convert import llama, released
from vlm_jax.convert import rules as R
from vlm_jax.convert.checkpoint import ConversionError
from vlm_jax.models import cogagent
from vlm_jax.nn import vit

NAME = "cogagent"
FAMILY = "cogagent"
VIT_LAYOUT = dict(mlp_activation="gelu", class_token=True)  # as configs/cogagent.py
SOURCES = ("checkpoint",)
NEW = {r"vision/.*": "CogAgent's low-res EVA2-CLIP-E normalises each branch's output "
                    "(x + LN(Attn(x))); our ViT is pre-LN (vlm_jax/convert/cogagent.py)",
       r"high_res/.*": "CogAgent's high-res EVA-02-L (rotary, SwiGLU with sub-LayerNorms) is "
                       "not our pre-LN ViT (vlm_jax/convert/cogagent.py)"}
TOWERS = (r"model\.vision\.(patch_embedding|transformer)\..*", r"model\.cross_vision\..*")
_L = "model.layers.{i}."
_QKV = ("query", "key", "value")


def _swiglu(ours: str, hf: str) -> list[R.Rule]:
  return [R.dense(f"{ours}/wi/kernel", f"{hf}.gate_proj.weight"),
          R.dense(f"{ours}/wi_gate/kernel", f"{hf}.up_proj.weight"),
          R.dense(f"{ours}/wo/kernel", f"{hf}.down_proj.weight")]


def _inv_freq(q_kernel):
  """The rotary buffer HF saves: 1 / 10000^(2j / head_dim)."""
  head_dim = q_kernel.shape[-1]
  return (1.0 / 10_000 ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim),)


def _expert_qkv(prefix: str, hf: str, inv_freq: bool) -> R.Rule:
  """A fused q/k/v projection; export also writes the layer's rotary buffer (once)."""
  rule = R.fused(tuple(f"self_attention/{prefix}{n}/kernel" for n in _QKV), hf)
  if not inv_freq:
    return rule
  return R.Rule(rule.targets, (hf, _L + "self_attn.rotary_emb.inv_freq"), rule.to_ours,
                lambda q, k, v: rule.to_hf(q, k, v) + _inv_freq(q))


def _layer(visual_expert: bool, cross: bool, exporting: bool) -> list[R.Rule]:
  attn = _L + "self_attn."
  rules = [R.copy("pre_attention_norm/scale", _L + "input_layernorm.weight"),
           _expert_qkv("", attn + "language_expert_query_key_value.weight", exporting),
           R.dense("self_attention/out/kernel", attn + "language_expert_dense.weight", 2),
           R.copy("pre_mlp_norm/scale", _L + "post_attention_layernorm.weight"),
           *_swiglu("mlp", _L + "mlp.language_mlp")]
  if visual_expert:
    rules += [_expert_qkv("vision_", attn + "vision_expert_query_key_value.weight", False),
              R.dense("self_attention/vision_out/kernel", attn + "vision_expert_dense.weight", 2),
              *_swiglu("vision_mlp", _L + "mlp.vision_mlp")]
  if cross:
    rules += [R.copy("pre_cross_attention_norm/scale",
                     _L + "post_cross_attention_layernorm.weight"),
              R.dense("cross_attention/query/kernel", _L + "cross_attn.query.weight"),
              R.fused(("cross_attention/key/kernel", "cross_attention/value/kernel"),
                      _L + "cross_attn.key_value.weight"),
              R.dense("cross_attention/out/kernel", _L + "cross_attn.dense.weight", 2)]
  return rules


def _boundary(ours: str, hf: str) -> R.Rule:
  return R.Rule((ours,), (hf,), lambda w, shapes: (w.reshape(shapes[0]),),
                lambda x: (x.reshape(1, 1, -1),))


_GLU = "model.vision.linear_proj."
ADAPTER = [R.dense("adapter/linear_proj/kernel", _GLU + "linear_proj.weight"),
           *R.layer_norm("adapter/norm", _GLU + "norm1"),
           R.dense("adapter/glu/wi/kernel", _GLU + "gate_proj.weight"),
           R.dense("adapter/glu/wi_gate/kernel", _GLU + "dense_h_to_4h.weight"),
           R.dense("adapter/glu/wo/kernel", _GLU + "dense_4h_to_h.weight"),
           _boundary("adapter/boi", "model.vision.boi"),
           _boundary("adapter/eoi", "model.vision.eoi")]


def layout(model, checkpoint=None) -> released.Layout:
  """Rules between `model`'s parameters and the checkpoint (None: export)."""
  cross = model.high_res is not None

  def slots(paths, names):
    plain = [R.copy("lm/embed/embedding", "model.embed_tokens.weight"),
             R.copy("lm/final_norm/scale", "model.norm.weight"),
             R.dense("lm/logits_projection/kernel", "lm_head.weight"), *ADAPTER]
    layer = _layer(model.lm.layer_kwargs["visual_expert"], cross, exporting=names is None)
    return R.under(R.expand(paths, plain, [("lm/layers", layer)]), "", "checkpoint:")

  del checkpoint
  buffers = r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"
  return released.Layout(NAME, tuple("checkpoint:" + p for p in (*TOWERS, buffers)), slots)


def model_config(checkpoint) -> dict:
  """config.model's CogAgent fields from the release's config.json (the high-res tower's
  sizes are not in it: ours default to EVA-02-L's; override high_res.* otherwise)."""
  config = checkpoint.config("checkpoint")
  if config.get("model_type") not in ("cogagent", "cogvlm"):
    raise ConversionError(f"{NAME}: config.json has model_type={config.get('model_type')!r}; "
                          "expected 'cogagent' (CogAgentForCausalLM).")
  hf_lm = llama.module_kwargs({**config, "model_type": "llama"})
  names = set(checkpoint.tensors)
  lm = {k: hf_lm[k] for k in ("vocab_size", "width", "num_layers", "num_heads", "mlp_dim",
                              "norm_epsilon", "rotary_max_wavelength")}
  theirs = config.get("vision_config") or {}
  vision = dict(vit.variant("E/14", depth=63), **VIT_LAYOUT)  # EVA2-CLIP-E less its last layer
  for ours, key in (("width", "hidden_size"), ("depth", "num_hidden_layers"),
                    ("num_heads", "num_heads"), ("mlp_dim", "intermediate_size"),
                    ("patch_size", "patch_size")):
    if key in theirs:
      vision[ours] = theirs[key]
  cross = "checkpoint:model.layers.0.cross_attn.query.weight" in names
  return dict(
      name=FAMILY, lm=lm, vision=vision,
      adapter=dict(mlp_dim=checkpoint.shape(f"checkpoint:{_GLU}gate_proj.weight")[0]),
      high_res=dict(vit.variant("L/14"), **VIT_LAYOUT,
                    width=config.get("cross_hidden_size", 1024)),
      cross=dict(width=config.get("cross_compute_hidden_size", 1024), heads=lm["num_heads"]),
      visual_expert="checkpoint:model.layers.0.mlp.vision_mlp.up_proj.weight" in names,
      cross_module=cross)


def example_batch(checkpoint, model) -> dict:
  config = checkpoint.config("checkpoint")
  low = (config.get("vision_config") or {}).get("image_size", 224)
  high = config.get("cross_image_size", 1120)
  tokens = cogagent.image_tokens(low, model.vision.patch_size)
  return {"images": jnp.zeros((1, 1, low, low, 3)), "image_mask": jnp.ones((1, 1)),
          "high_res_images": jnp.zeros((1, 1, high, high, 3)),
          "image_positions": jnp.zeros((1, 1), jnp.int32),
          "tokens": jnp.zeros((1, tokens), jnp.int32), "token_mask": jnp.ones((1, tokens))}


def hf_configs(model, params) -> dict:
  """The LM's part of config.json (the release's own config.json also describes the towers)."""
  del params
  lm = model.lm
  return {"checkpoint": {
      "architectures": ["CogAgentForCausalLM"], "model_type": "cogagent",
      "vocab_size": lm.vocab_size, "hidden_size": lm.width,
      "intermediate_size": lm.mlp_dim, "num_hidden_layers": lm.num_layers,
      "num_attention_heads": lm.num_heads, "rms_norm_eps": lm.norm_epsilon,
      "hidden_act": "silu", "cross_compute_hidden_size": lm.layer_kwargs["cross_width"],
      "cross_hidden_size": model.high_res.width if model.high_res else 1024}}
