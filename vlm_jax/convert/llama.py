"""LLaMA / LLaMA-2 / Vicuna (HF `LlamaForCausalLM`) <-> `vlm_jax.nn.decoder_lm.DecoderLM`.

    model.embed_tokens.weight [V, D]             embed/embedding
    model.layers.{i}.input_layernorm.weight      <stack>/pre_attention_norm/scale
    model.layers.{i}.self_attn.{q,k,v}_proj      <stack>/self_attention/{query,key,value}/kernel
                                                 [D, N|K, H] (transposed, split into heads)
    model.layers.{i}.self_attn.o_proj            <stack>/self_attention/out/kernel [N, H, D]
    model.layers.{i}.post_attention_layernorm    <stack>/pre_mlp_norm/scale
    model.layers.{i}.mlp.gate_proj / up_proj     <stack>/mlp/wi / wi_gate (SwiGLU: silu(wi)*wi_gate)
    model.layers.{i}.mlp.down_proj               <stack>/mlp/wo
    model.norm.weight                            final_norm/scale
    lm_head.weight [V, D]                        logits_projection/kernel (absent when tied)

HF checkpoints already hold q/k in the rotate-half rotary layout that
`embeddings.apply_rotary` implements, so nothing is permuted. LoRA params (`lora_a/lora_b`)
are not in HF checkpoints: they are new on import and merged (`nn.lora.merge_lora`) on export.
"""
import jax.numpy as jnp

from vlm_jax.convert import rules as R
from vlm_jax.convert.checkpoint import ConversionError
from vlm_jax.nn import decoder_lm

NAME = "llama"
MODEL_TYPES = ("llama",)
IGNORE = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)  # old checkpoints' buffers

LAYER = [
    R.copy("pre_attention_norm/scale", "model.layers.{i}.input_layernorm.weight"),
    R.dense("self_attention/query/kernel", "model.layers.{i}.self_attn.q_proj.weight"),
    R.dense("self_attention/key/kernel", "model.layers.{i}.self_attn.k_proj.weight"),
    R.dense("self_attention/value/kernel", "model.layers.{i}.self_attn.v_proj.weight"),
    R.dense("self_attention/out/kernel", "model.layers.{i}.self_attn.o_proj.weight", in_axes=2),
    R.copy("pre_mlp_norm/scale", "model.layers.{i}.post_attention_layernorm.weight"),
    R.dense("mlp/wi/kernel", "model.layers.{i}.mlp.gate_proj.weight"),
    R.dense("mlp/wi_gate/kernel", "model.layers.{i}.mlp.up_proj.weight"),
    R.dense("mlp/wo/kernel", "model.layers.{i}.mlp.down_proj.weight"),
]


def slots(paths: dict, names: set | None) -> list[R.Slot]:
  """`paths`: our leaf paths -> shapes; `names`: the checkpoint's tensors (None: export)."""
  del names
  plain = [R.copy("embed/embedding", "model.embed_tokens.weight"),
           R.copy("final_norm/scale", "model.norm.weight")]
  if "logits_projection/kernel" in paths:
    plain.append(R.dense("logits_projection/kernel", "lm_head.weight"))
  return R.expand(paths, plain, [("layers", LAYER)])


def rope_theta(config: dict) -> float:
  rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind != "default":
    raise ConversionError(f"rope_type={kind!r} (rope scaling) is not implemented; only plain "
                          "rotary positions are.")
  return float(rope.get("rope_theta", config.get("rope_theta", 10_000.0)))


def _require(config: dict, **expected):
  for key, want in expected.items():
    if key in config and config[key] != want:
      raise ConversionError(f"{NAME}: config.json has {key}={config[key]!r}; only {want!r} "
                            "is supported.")


def module_kwargs(config: dict) -> dict:
  """`DecoderLM` hyperparameters from an HF LlamaConfig (config.json)."""
  _require(config, hidden_act="silu", attention_bias=False, mlp_bias=False)
  width, heads = config["hidden_size"], config["num_attention_heads"]
  return dict(vocab_size=config["vocab_size"], width=width,
              num_layers=config["num_hidden_layers"], num_heads=heads,
              mlp_dim=config["intermediate_size"],
              head_dim=config.get("head_dim") or width // heads,
              num_kv_heads=config.get("num_key_value_heads") or heads,
              norm_epsilon=config.get("rms_norm_eps", 1e-6),
              rotary_max_wavelength=rope_theta(config),
              max_length=config.get("max_position_embeddings", 4096),
              tie_embeddings=config.get("tie_word_embeddings", False))


def build(config: dict, **overrides):
  """(DecoderLM, example call args) from config.json; `overrides` set other fields."""
  lm = decoder_lm.DecoderLM(**{**module_kwargs(config), **overrides})
  return lm, (jnp.zeros((1, 1), jnp.int32),)


def hf_config(lm, shapes: dict) -> dict:
  """config.json for a `DecoderLM` with LLaMA's layout (checked)."""
  del shapes
  layout = dict(norm_type="rmsnorm", mlp_activation="swiglu", position="rotary",
                use_bias=False, parallel_residual=False)
  wrong = {k: getattr(lm, k) for k, v in layout.items() if getattr(lm, k) != v}
  if wrong:
    raise ConversionError(f"this LM is not LLaMA-shaped ({wrong}; LLaMA needs {layout}).")
  theta = float(lm.rotary_max_wavelength)
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
          "vocab_size": lm.vocab_size, "hidden_size": lm.width,
          "intermediate_size": lm.mlp_dim, "num_hidden_layers": lm.num_layers,
          "num_attention_heads": lm.num_heads,
          "num_key_value_heads": lm.num_kv_heads or lm.num_heads,
          "head_dim": lm.head_dim or lm.width // lm.num_heads, "hidden_act": "silu",
          "rms_norm_eps": lm.norm_epsilon, "max_position_embeddings": lm.max_length,
          "rope_theta": theta, "rope_parameters": {"rope_theta": theta, "rope_type": "default"},
          "tie_word_embeddings": bool(lm.tie_embeddings), "attention_bias": False,
          "mlp_bias": False}
