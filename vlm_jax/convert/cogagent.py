"""CogAgent's HF release (huggingface.co/THUDM/cogagent-chat-hf, also cogagent-vqa-hf: the
safetensors shards + config.json of `CogAgentForCausalLM`, modeling_cogagent.py, visual.py,
cross_visual.py; the towers' names and semantics as ported in vLLM's
cogagent_vision_encoder.py and PaddleMIX's cogvlm/visual.py) <->
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

Low-res tower (visual.py's EVA2CLIPModel; `vision`, models/cogagent.py's EVA2_CLIP_LAYOUT):
    model.vision.patch_embedding.proj.{weight,bias}             vision/patch_embedding
    model.vision.patch_embedding.cls_embedding [1, D]           vision/cls
    model.vision.patch_embedding.position_embedding.weight      vision/pos_embedding
    model.vision.transformer.layers.{i}.                        vision/<stack>/
        input_layernorm (on the attention's output)               post_attention_norm
        attention.query_key_value [3D, D] + bias, rows [q; k; v]  self_attention/{query,key,
                                                                  value}
        attention.dense                                           self_attention/out
        mlp.fc1 / fc2 (GELU)                                      mlp/wi / wo
        post_attention_layernorm (on the MLP's output)            post_mlp_norm
    model.vision.pos_embed [P, D] (CogAgent; CogVLM has none)   vision/output_pos_embedding
High-res tower (cross_visual.py: EVA-02-L, `high_res`, EVA02_LAYOUT), under
model.cross_vision.vit.model.:
    patch_embed.proj.{weight,bias}, cls_token [1, 1, D]         high_res/patch_embedding, cls
    pos_embed [1, 1 + P, D]                                     high_res/pos_embedding
    blocks.{i}.norm1 / norm2                                    high_res/<stack>/pre_attention_norm
                                                                  / pre_mlp_norm
    blocks.{i}.attn.{q,k,v}_proj.weight, q_bias, v_bias         .../self_attention/{query,key,
                                                                  value} (no key bias)
    blocks.{i}.attn.inner_attn_ln, attn.proj                    .../self_attention/inner_norm, out
    blocks.{i}.mlp.w1 (SiLU) / w2 / ffn_ln / w3                 .../mlp/wi / wi_gate / hidden_norm
                                                                  / wo
    model.cross_vision.pos_embed [P, D]                         high_res/output_pos_embedding
  cross_visual.py's forward runs every block but the last and returns the patch tokens
  without the final norm, so the last block, `norm` and `head` are ignored (not exported);
  so are its rotary buffers (`rope.freqs_cos/sin`, recomputed; vLLM's loader skips
  `cross_vision.vit.model.rope` too). The tower's sizes are
  not in config.json: they are read from the tensors (heads = width / 64, EVA-02's head
  width).
"""
import re

import jax.numpy as jnp
import numpy as np

from vlm_jax.convert import llama, released
from vlm_jax.convert import rules as R
from vlm_jax.convert.checkpoint import ConversionError
from vlm_jax.models import cogagent
from vlm_jax.nn import vit

NAME = "cogagent"
FAMILY = "cogagent"
SOURCES = ("checkpoint",)
EVA02_HEAD_WIDTH = 64  # cross_visual.py's head_width
EVA02_NORM_EPSILON = 1e-6
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


def _unit_axes(ours: str, hf: str, count: int) -> R.Rule:
  """A tensor stored with `count` leading unit axes (e.g. cls_token [1, 1, D])."""
  return R.Rule((ours,), (hf,), lambda w, shapes: (w.reshape(shapes[0]),),
                lambda x: (x.reshape((1,) * count + x.shape),))


_LOW = "model.vision."
_LOW_LAYER = _LOW + "transformer.layers.{i}."
LOW_RES = [R.conv("vision/patch_embedding/kernel", _LOW + "patch_embedding.proj.weight"),
           R.copy("vision/patch_embedding/bias", _LOW + "patch_embedding.proj.bias"),
           _unit_axes("vision/cls", _LOW + "patch_embedding.cls_embedding", 1),
           R.copy("vision/pos_embedding/pos_embedding",
                  _LOW + "patch_embedding.position_embedding.weight")]
LOW_RES_LAYER = [
    *R.layer_norm("post_attention_norm", _LOW_LAYER + "input_layernorm"),
    R.fused(tuple(f"self_attention/{n}/kernel" for n in _QKV),
            _LOW_LAYER + "attention.query_key_value.weight"),
    R.fused_vector(tuple(f"self_attention/{n}/bias" for n in _QKV),
                   _LOW_LAYER + "attention.query_key_value.bias"),
    *R.linear("self_attention/out", _LOW_LAYER + "attention.dense", 2),
    *R.linear("mlp/wi", _LOW_LAYER + "mlp.fc1"), *R.linear("mlp/wo", _LOW_LAYER + "mlp.fc2"),
    *R.layer_norm("post_mlp_norm", _LOW_LAYER + "post_attention_layernorm")]

_HIGH = "model.cross_vision.vit.model."
_BLOCK = _HIGH + "blocks.{i}."
HIGH_RES = [R.conv("high_res/patch_embedding/kernel", _HIGH + "patch_embed.proj.weight"),
            R.copy("high_res/patch_embedding/bias", _HIGH + "patch_embed.proj.bias"),
            _unit_axes("high_res/cls", _HIGH + "cls_token", 2),
            _unit_axes("high_res/pos_embedding/pos_embedding", _HIGH + "pos_embed", 1),
            R.copy("high_res/output_pos_embedding/pos_embedding", "model.cross_vision.pos_embed")]
HIGH_RES_LAYER = [
    *R.layer_norm("pre_attention_norm", _BLOCK + "norm1"),
    *(R.dense(f"self_attention/{n}/kernel", f"{_BLOCK}attn.{n[0]}_proj.weight") for n in _QKV),
    R.vector("self_attention/query/bias", _BLOCK + "attn.q_bias"),
    R.vector("self_attention/value/bias", _BLOCK + "attn.v_bias"),
    *R.layer_norm("self_attention/inner_norm", _BLOCK + "attn.inner_attn_ln"),
    *R.linear("self_attention/out", _BLOCK + "attn.proj", 2),
    *R.layer_norm("pre_mlp_norm", _BLOCK + "norm2"),
    *R.linear("mlp/wi", _BLOCK + "mlp.w1"), *R.linear("mlp/wi_gate", _BLOCK + "mlp.w2"),
    *R.layer_norm("mlp/hidden_norm", _BLOCK + "mlp.ffn_ln"), *R.linear("mlp/wo", _BLOCK + "mlp.w3")]


_GLU = "model.vision.linear_proj."
ADAPTER = [R.dense("adapter/linear_proj/kernel", _GLU + "linear_proj.weight"),
           *R.layer_norm("adapter/norm", _GLU + "norm1"),
           R.dense("adapter/glu/wi/kernel", _GLU + "gate_proj.weight"),
           R.dense("adapter/glu/wi_gate/kernel", _GLU + "dense_h_to_4h.weight"),
           R.dense("adapter/glu/wo/kernel", _GLU + "dense_4h_to_h.weight"),
           _unit_axes("adapter/boi", "model.vision.boi", 2),
           _unit_axes("adapter/eoi", "model.vision.eoi", 2)]


def layout(model, checkpoint=None) -> released.Layout:
  """Rules between `model`'s parameters and the checkpoint (None: export)."""
  cross = model.high_res is not None

  def slots(paths, names):
    plain = [R.copy("lm/embed/embedding", "model.embed_tokens.weight"),
             R.copy("lm/final_norm/scale", "model.norm.weight"),
             R.dense("lm/logits_projection/kernel", "lm_head.weight"), *ADAPTER, *LOW_RES]
    if model.vision.output_pos_embedding:
      plain.append(R.copy("vision/output_pos_embedding/pos_embedding", _LOW + "pos_embed"))
    stacks = [("lm/layers", _layer(model.lm.layer_kwargs["visual_expert"], cross,
                                   exporting=names is None)),
              ("vision/encoder", LOW_RES_LAYER)]
    if cross:
      plain += HIGH_RES
      stacks.append(("high_res/encoder", HIGH_RES_LAYER))
    return R.under(R.expand(paths, plain, stacks), "", "checkpoint:")

  del checkpoint
  ignored = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
             r"model\.cross_vision\..*\.freqs_(cos|sin)"]
  if cross:  # what cross_visual.py's forward never uses (module docstring)
    ignored += [rf"{re.escape(_HIGH)}blocks\.{model.high_res.depth}\..*",
                rf"{re.escape(_HIGH)}(norm|head)\..*"]
  return released.Layout(NAME, tuple("checkpoint:" + p for p in ignored), slots)


def model_config(checkpoint) -> dict:
  """config.model's CogAgent fields from the release's config.json and, for the high-res
  tower (whose sizes config.json does not hold), from its tensors' shapes."""
  config = checkpoint.config("checkpoint")
  if config.get("model_type") not in ("cogagent", "cogvlm"):
    raise ConversionError(f"{NAME}: config.json has model_type={config.get('model_type')!r}; "
                          "expected 'cogagent' (CogAgentForCausalLM).")
  hf_lm = llama.module_kwargs({**config, "model_type": "llama"})
  names = set(checkpoint.tensors)
  lm = {k: hf_lm[k] for k in ("vocab_size", "width", "num_layers", "num_heads", "mlp_dim",
                              "norm_epsilon", "rotary_max_wavelength")}
  theirs = config.get("vision_config") or {}
  vision = {**vit.variant("E/14", depth=63), **cogagent.EVA2_CLIP_LAYOUT,
            "norm_epsilon": theirs.get("layer_norm_eps", 1e-6),
            "output_pos_embedding": f"checkpoint:{_LOW}pos_embed" in names}
  for ours, key in (("width", "hidden_size"), ("depth", "num_hidden_layers"),
                    ("num_heads", "num_heads"), ("mlp_dim", "intermediate_size"),
                    ("patch_size", "patch_size")):
    if key in theirs:
      vision[ours] = theirs[key]
  if theirs.get("hidden_act", "gelu") != "gelu":
    raise ConversionError(f"{NAME}: vision_config.hidden_act={theirs['hidden_act']!r}; the "
                          "low-res tower is read as GELU.")
  cross = "checkpoint:model.layers.0.cross_attn.query.weight" in names
  return dict(
      name=FAMILY, lm=lm, vision=vision,
      adapter=dict(mlp_dim=checkpoint.shape(f"checkpoint:{_GLU}gate_proj.weight")[0]),
      high_res=_high_res_config(checkpoint, names) if cross else dict(
          vit.variant("L/14", depth=23), **cogagent.EVA02_LAYOUT),
      cross=dict(width=config.get("cross_compute_hidden_size", 1024), heads=lm["num_heads"]),
      visual_expert="checkpoint:model.layers.0.mlp.vision_mlp.up_proj.weight" in names,
      cross_module=cross)


def _high_res_config(checkpoint, names) -> dict:
  """The EVA-02 tower's sizes from its tensors; one block fewer than stored (the last one
  is unused, module docstring)."""
  blocks = {int(m.group(1)) for n in names
            if (m := re.fullmatch(rf"checkpoint:{re.escape(_HIGH)}blocks\.(\d+)\..*", n))}
  if not blocks:
    raise ConversionError(f"{NAME}: the checkpoint has cross-attention but no high-res tower "
                          f"tensors ({_HIGH}blocks.*).")
  width, _, patch, _ = checkpoint.shape(f"checkpoint:{_HIGH}patch_embed.proj.weight")
  if width % EVA02_HEAD_WIDTH:
    raise ConversionError(f"{NAME}: {_HIGH}patch_embed.proj.weight has width {width}, not a "
                          f"multiple of EVA-02's head width {EVA02_HEAD_WIDTH}.")
  return dict(cogagent.EVA02_LAYOUT, width=width, depth=max(blocks), patch_size=patch,
              num_heads=width // EVA02_HEAD_WIDTH, norm_epsilon=EVA02_NORM_EPSILON,
              mlp_dim=checkpoint.shape(f"checkpoint:{_HIGH}blocks.0.mlp.w1.weight")[0])


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
  """config.json: the LM, the cross-module and the low-res tower's vision_config (the
  high-res tower's sizes are its tensors')."""
  lm, low = model.lm, model.vision
  positions = params["vision"]["pos_embedding"]["pos_embedding"].shape[0]
  vision_config = {
      "hidden_size": low.width, "num_hidden_layers": low.depth, "num_heads": low.num_heads,
      "intermediate_size": low.mlp_dim, "patch_size": low.patch_size,
      "image_size": round((positions - 1) ** 0.5) * low.patch_size, "num_positions": positions,
      "in_channels": params["vision"]["patch_embedding"]["kernel"].shape[2],
      "hidden_act": low.mlp_activation, "layer_norm_eps": low.norm_epsilon, "dropout_prob": 0.0}
  extra = {}
  if model.high_res is not None:
    grid = params["high_res"]["output_pos_embedding"]["pos_embedding"].shape[0]
    extra["cross_image_size"] = round(grid ** 0.5) * model.high_res.patch_size
  return {"checkpoint": {
      "architectures": ["CogAgentForCausalLM"], "model_type": "cogagent",
      "vocab_size": lm.vocab_size, "hidden_size": lm.width,
      "intermediate_size": lm.mlp_dim, "num_hidden_layers": lm.num_layers,
      "num_attention_heads": lm.num_heads, "rms_norm_eps": lm.norm_epsilon,
      "hidden_act": "silu", "cross_compute_hidden_size": lm.layer_kwargs["cross_width"],
      "cross_hidden_size": model.high_res.width if model.high_res else 1024,
      "vision_config": vision_config, **extra}}
