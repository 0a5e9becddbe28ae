"""GPT-NeoX / RedPajama-INCITE (HF `GPTNeoXForCausalLM`; OpenFlamingo-4B's LM) <->
`DecoderLM(norm_type='layernorm', use_bias=True, mlp_activation='gelu',
parallel_residual=True)`.

    gpt_neox.embed_in.weight                               embed/embedding
    gpt_neox.layers.{i}.input_layernorm                    <stack>/pre_attention_norm
    gpt_neox.layers.{i}.post_attention_layernorm           <stack>/pre_mlp_norm
    gpt_neox.layers.{i}.attention.query_key_value          <stack>/self_attention/{query,key,
        weight [N*3*H, D], bias [N*3*H]: rows are             value}/{kernel,bias}
        (head, q|k|v, head_dim), so per head [q; k; v]
    gpt_neox.layers.{i}.attention.dense                    <stack>/self_attention/out
    gpt_neox.layers.{i}.mlp.dense_h_to_4h / dense_4h_to_h  <stack>/mlp/wi / wo
    gpt_neox.final_layer_norm                              final_norm
    embed_out.weight                                       logits_projection/kernel

Rotary must cover the whole head (`rotary_pct` / `partial_rotary_factor` 1.0, as
RedPajama-INCITE-3B); NeoX-20B's 0.25 is refused because `DecoderLM` rotates full heads.
"""
import jax.numpy as jnp

from vlm_jax.convert import llama
from vlm_jax.convert import rules as R
from vlm_jax.convert.checkpoint import ConversionError
from vlm_jax.nn import decoder_lm

NAME = "gpt_neox"
MODEL_TYPES = ("gpt_neox",)
# Causal-mask and rotary buffers that older checkpoints saved.
IGNORE = (r"gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)",)


def _qkv_weight(w, shapes):
  width, heads, head_dim = shapes[0]
  w = w.reshape(heads, 3, head_dim, width)
  return tuple(jnp.transpose(w[:, j], (2, 0, 1)) for j in range(3))  # [D, N, H] each


def _qkv_weight_to_hf(q, k, v):
  w = jnp.stack([jnp.transpose(x, (1, 2, 0)) for x in (q, k, v)], axis=1)  # [N, 3, H, D]
  return (w.reshape(-1, w.shape[-1]),)


def _qkv_bias(b, shapes):
  heads, head_dim = shapes[0]
  b = b.reshape(heads, 3, head_dim)
  return tuple(b[:, j] for j in range(3))


def _qkv_bias_to_hf(q, k, v):
  return (jnp.stack([q, k, v], axis=1).reshape(-1),)


def _norm(ours, hf):
  return [R.copy(f"{ours}/scale", f"{hf}.weight"), R.copy(f"{ours}/bias", f"{hf}.bias")]


def _dense(ours, hf, in_axes=1):
  return [R.dense(f"{ours}/kernel", f"{hf}.weight", in_axes), R.vector(f"{ours}/bias", f"{hf}.bias")]


_QKV = "gpt_neox.layers.{i}.attention.query_key_value"
LAYER = [
    *_norm("pre_attention_norm", "gpt_neox.layers.{i}.input_layernorm"),
    R.Rule(tuple(f"self_attention/{n}/kernel" for n in ("query", "key", "value")),
           (f"{_QKV}.weight",), _qkv_weight, _qkv_weight_to_hf),
    R.Rule(tuple(f"self_attention/{n}/bias" for n in ("query", "key", "value")),
           (f"{_QKV}.bias",), _qkv_bias, _qkv_bias_to_hf),
    *_dense("self_attention/out", "gpt_neox.layers.{i}.attention.dense", in_axes=2),
    *_norm("pre_mlp_norm", "gpt_neox.layers.{i}.post_attention_layernorm"),
    *_dense("mlp/wi", "gpt_neox.layers.{i}.mlp.dense_h_to_4h"),
    *_dense("mlp/wo", "gpt_neox.layers.{i}.mlp.dense_4h_to_h"),
]


def slots(paths: dict, names: set | None) -> list[R.Slot]:
  """`paths`: our leaf paths -> shapes; `names`: the checkpoint's tensors (None: export)."""
  del names
  plain = [R.copy("embed/embedding", "gpt_neox.embed_in.weight"),
           *_norm("final_norm", "gpt_neox.final_layer_norm")]
  if "logits_projection/kernel" in paths:
    plain.append(R.dense("logits_projection/kernel", "embed_out.weight"))
  return R.expand(paths, plain, [("layers", LAYER)])


def _rotary_fraction(config: dict) -> float:
  rope = config.get("rope_parameters") or {}
  return float(rope.get("partial_rotary_factor", config.get("rotary_pct", 0.25)))


def module_kwargs(config: dict) -> dict:
  """`DecoderLM` hyperparameters from an HF GPTNeoXConfig (config.json)."""
  if config.get("hidden_act", "gelu") != "gelu":
    raise ConversionError(f"{NAME}: hidden_act={config['hidden_act']!r}; only exact 'gelu' "
                          "is supported.")
  if not config.get("attention_bias", True):
    raise ConversionError(f"{NAME}: attention_bias=False is not supported (use_bias covers "
                          "attention, MLP and LayerNorm together).")
  if _rotary_fraction(config) != 1.0:
    raise ConversionError(f"{NAME}: partial rotary (rotary_pct={_rotary_fraction(config)}) is "
                          "not supported; DecoderLM rotates the whole head (RedPajama-INCITE "
                          "uses 1.0).")
  return dict(vocab_size=config["vocab_size"], width=config["hidden_size"],
              num_layers=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
              mlp_dim=config["intermediate_size"], mlp_activation="gelu",
              norm_type="layernorm", norm_epsilon=config.get("layer_norm_eps", 1e-5),
              use_bias=True, rotary_max_wavelength=llama.rope_theta(config),
              max_length=config.get("max_position_embeddings", 2048),
              parallel_residual=config.get("use_parallel_residual", True),
              tie_embeddings=config.get("tie_word_embeddings", False))


def build(config: dict, **overrides):
  """(DecoderLM, example call args) from config.json; `overrides` set other fields."""
  lm = decoder_lm.DecoderLM(**{**module_kwargs(config), **overrides})
  return lm, (jnp.zeros((1, 1), jnp.int32),)


def hf_config(lm, shapes: dict) -> dict:
  """config.json for a `DecoderLM` with GPT-NeoX's layout (checked)."""
  del shapes
  layout = dict(norm_type="layernorm", mlp_activation="gelu", position="rotary", use_bias=True)
  wrong = {k: getattr(lm, k) for k, v in layout.items() if getattr(lm, k) != v}
  if lm.num_kv_heads not in (None, lm.num_heads) or lm.head_dim not in (
      None, lm.width // lm.num_heads):
    wrong.update(num_kv_heads=lm.num_kv_heads, head_dim=lm.head_dim)
  if wrong:
    raise ConversionError(f"this LM is not GPT-NeoX-shaped ({wrong}; GPT-NeoX needs {layout}, "
                          "no grouped-query attention, head_dim = width / heads).")
  theta = float(lm.rotary_max_wavelength)
  return {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox",
          "vocab_size": lm.vocab_size, "hidden_size": lm.width,
          "intermediate_size": lm.mlp_dim, "num_hidden_layers": lm.num_layers,
          "num_attention_heads": lm.num_heads, "hidden_act": "gelu",
          "layer_norm_eps": lm.norm_epsilon, "max_position_embeddings": lm.max_length,
          "rotary_pct": 1.0, "rotary_emb_base": theta,
          "rope_parameters": {"rope_theta": theta, "rope_type": "default",
                              "partial_rotary_factor": 1.0},
          "use_parallel_residual": bool(lm.parallel_residual),
          "tie_word_embeddings": bool(lm.tie_embeddings), "attention_bias": True}
