"""MPT (HF `MptForCausalLM`; MosaicML's MPT-7B, OpenFlamingo-9B's LM) <->
`DecoderLM(norm_type='layernorm', use_bias=False, mlp_activation='gelu',
tie_embeddings=True, position='alibi')`.

    transformer.wte.weight [V, D]                     embed/embedding (also the tied logits)
    transformer.blocks.{i}.norm_1.weight              <stack>/pre_attention_norm/scale
    transformer.blocks.{i}.attn.Wqkv.weight [3D, D]   <stack>/self_attention/{query,key,value}
        rows [q; k; v], each (heads, head_dim)          /kernel [D, N, H]
    transformer.blocks.{i}.attn.out_proj.weight       <stack>/self_attention/out/kernel
    transformer.blocks.{i}.norm_2.weight              <stack>/pre_mlp_norm/scale
    transformer.blocks.{i}.ffn.up_proj / down_proj    <stack>/mlp/wi / wo
    transformer.norm_f.weight                         final_norm/scale

MPT has no biases (`no_bias`), not even in its LayerNorms, ties the output projection to
`wte` (`lm_head.weight`, when a checkpoint holds the copy, is ignored) and adds ALiBi with
`attn_config.alibi_bias_max` (HF's MptModel always uses 8; MosaicML's code reads the field).
Refused: `qk_ln` (MPT-1B-RedPajama's QK LayerNorm), `clip_qkv`, a custom `softmax_scale`,
`logit_scale`, learned positions instead of ALiBi.
"""
import jax.numpy as jnp

from vlm_jax.convert import rules as R
from vlm_jax.convert.checkpoint import ConversionError
from vlm_jax.nn import decoder_lm

NAME = "mpt"
MODEL_TYPES = ("mpt",)
IGNORE = (r"lm_head\.weight",)  # tied: a copy of transformer.wte.weight

_B = "transformer.blocks.{i}"
LAYER = [
    R.copy("pre_attention_norm/scale", f"{_B}.norm_1.weight"),
    R.fused(tuple(f"self_attention/{n}/kernel" for n in ("query", "key", "value")),
            f"{_B}.attn.Wqkv.weight"),
    R.dense("self_attention/out/kernel", f"{_B}.attn.out_proj.weight", in_axes=2),
    R.copy("pre_mlp_norm/scale", f"{_B}.norm_2.weight"),
    R.dense("mlp/wi/kernel", f"{_B}.ffn.up_proj.weight"),
    R.dense("mlp/wo/kernel", f"{_B}.ffn.down_proj.weight"),
]
EMBED = R.copy("embed/embedding", "transformer.wte.weight")
FINAL_NORM = R.copy("final_norm/scale", "transformer.norm_f.weight")


def slots(paths: dict, names: set | None) -> list[R.Slot]:
  """`paths`: our leaf paths -> shapes; `names`: the checkpoint's tensors (None: export)."""
  del names
  return R.expand(paths, [EMBED, FINAL_NORM], [("layers", LAYER)])


def module_kwargs(config: dict) -> dict:
  """`DecoderLM` hyperparameters from an HF MptConfig (config.json)."""
  attn = config.get("attn_config") or {}
  unsupported = {
      "attn_config.alibi": attn.get("alibi", True) is not True,
      "attn_config.qk_ln": bool(attn.get("qk_ln")),
      "attn_config.clip_qkv": attn.get("clip_qkv") is not None,
      "attn_config.softmax_scale": attn.get("softmax_scale") is not None,
      "logit_scale": config.get("logit_scale") is not None,
      "no_bias": config.get("no_bias", True) is not True,
      "tie_word_embeddings": config.get("tie_word_embeddings", True) is not True,
  }
  bad = [k for k, v in unsupported.items() if v]
  if bad:
    raise ConversionError(f"{NAME}: config.json sets {bad}; only MPT-7B's layout (ALiBi, no "
                          "QK LayerNorm, no clipping, default softmax scale, no biases, tied "
                          "embeddings) is supported.")
  width = config["d_model"]
  return dict(vocab_size=config["vocab_size"], width=width, num_layers=config["n_layers"],
              num_heads=config["n_heads"], mlp_dim=config.get("expansion_ratio", 4) * width,
              mlp_activation="gelu", norm_type="layernorm",
              norm_epsilon=config.get("layer_norm_epsilon", 1e-5), use_bias=False,
              position="alibi", alibi_bias_max=float(attn.get("alibi_bias_max", 8)),
              max_length=config.get("max_seq_len", 2048), tie_embeddings=True)


def build(config: dict, **overrides):
  """(DecoderLM, example call args) from config.json; `overrides` set other fields."""
  lm = decoder_lm.DecoderLM(**{**module_kwargs(config), **overrides})
  return lm, (jnp.zeros((1, 1), jnp.int32),)


def _int_if_whole(x: float):
  return int(x) if float(x).is_integer() else float(x)


def hf_config(lm, shapes: dict) -> dict:
  """config.json for a `DecoderLM` with MPT's layout (checked)."""
  del shapes
  layout = dict(norm_type="layernorm", mlp_activation="gelu", position="alibi",
                use_bias=False, parallel_residual=False, tie_embeddings=True)
  wrong = {k: getattr(lm, k) for k, v in layout.items() if getattr(lm, k) != v}
  if lm.num_kv_heads not in (None, lm.num_heads) or lm.head_dim not in (
      None, lm.width // lm.num_heads) or lm.mlp_dim % lm.width:
    wrong.update(num_kv_heads=lm.num_kv_heads, head_dim=lm.head_dim, mlp_dim=lm.mlp_dim)
  if wrong:
    raise ConversionError(f"this LM is not MPT-shaped ({wrong}; MPT needs {layout}, no "
                          "grouped-query attention, head_dim = width / heads, mlp_dim a "
                          "multiple of width).")
  return {"architectures": ["MptForCausalLM"], "model_type": "mpt", "d_model": lm.width,
          "n_heads": lm.num_heads, "n_layers": lm.num_layers,
          "expansion_ratio": lm.mlp_dim // lm.width, "max_seq_len": lm.max_length,
          "vocab_size": lm.vocab_size, "layer_norm_epsilon": lm.norm_epsilon,
          "no_bias": True, "logit_scale": None, "tie_word_embeddings": True,
          # HF's MptAttentionConfig types alibi_bias_max as an int (MPT-7B: 8).
          "attn_config": {"alibi": True, "alibi_bias_max": _int_if_whole(lm.alibi_bias_max),
                          "qk_ln": False, "clip_qkv": None, "softmax_scale": None,
                          "attn_type": "multihead_attention", "prefix_lm": False}}
