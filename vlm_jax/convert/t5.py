"""T5 v1.1 (HF `T5ForConditionalGeneration`, feed_forward_proj='gated-gelu') <-> SimVLM's text
encoder-decoder with `position='relative', norm_type='rmsnorm', mlp_activation='geglu',
use_bias=False` (the image embedder is not in T5: SimVLM's part excludes it).

    shared.weight                                          token_embedder/embedding
    encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight [buckets, N]
                                                           encoder_relative_bias/embedding
    encoder.block.{i}.layer.0.layer_norm                   encoder/<stack>/pre_attention_norm
    encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}      encoder/<stack>/self_attention/...
    encoder.block.{i}.layer.1.layer_norm                   encoder/<stack>/pre_mlp_norm
    encoder.block.{i}.layer.1.DenseReluDense.wi_0/wi_1/wo  encoder/<stack>/mlp/wi/wi_gate/wo
    encoder.final_layer_norm                               encoder_norm
    decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight
                                                           decoder_relative_bias/embedding
    decoder.block.{i}.layer.0 (SelfAttention)              decoder/<stack>/pre_self_attention_norm,
                                                           self_attention
    decoder.block.{i}.layer.1 (EncDecAttention)            .../pre_cross_attention_norm,
                                                           cross_attention
    decoder.block.{i}.layer.2 (DenseReluDense)             .../pre_mlp_norm, mlp
    decoder.final_layer_norm                               decoder_norm
    lm_head.weight                                         logits_projection/kernel (untied;
        from shared.weight when the checkpoint has no lm_head: transformers 5 ties T5's head
        to the embedding and only v1.0 configs scale the decoder output by d_model**-0.5,
        which our tied logits do, so v1.1 maps to tie_embeddings=False)

T5 does not scale attention logits by head_dim**-0.5 (its init absorbs it); our attention
does, so import multiplies the query kernels by sqrt(head_dim) and export divides. With
T5 v1.1's head_dim 64 that factor (8) is a power of two and the round trip is bit-exact.
"""
import math

from vlm_jax.convert import rules as R
from vlm_jax.convert.checkpoint import ConversionError

NAME = "t5"
MODEL_TYPES = ("t5",)
IGNORE = (r"(encoder|decoder)\.embed_tokens\.weight",)  # copies of shared.weight


def _query(target: str, source: str) -> R.Rule:
  def to_ours(w, shapes):
    return (w.T.reshape(shapes[0]) * math.sqrt(shapes[0][-1]),)

  def to_hf(kernel):
    return ((kernel / math.sqrt(kernel.shape[-1])).reshape(kernel.shape[0], -1).T,)
  return R.Rule((target,), (source,), to_ours, to_hf)


def _attention(ours: str, hf: str) -> list[R.Rule]:
  return [_query(f"{ours}/query/kernel", f"{hf}.q.weight"),
          R.dense(f"{ours}/key/kernel", f"{hf}.k.weight"),
          R.dense(f"{ours}/value/kernel", f"{hf}.v.weight"),
          R.dense(f"{ours}/out/kernel", f"{hf}.o.weight", in_axes=2)]


def _mlp(hf: str) -> list[R.Rule]:
  return [R.dense("mlp/wi/kernel", f"{hf}.wi_0.weight"),
          R.dense("mlp/wi_gate/kernel", f"{hf}.wi_1.weight"),
          R.dense("mlp/wo/kernel", f"{hf}.wo.weight")]


_E, _D = "encoder.block.{i}.layer", "decoder.block.{i}.layer"
ENCODER_LAYER = [
    R.copy("pre_attention_norm/scale", f"{_E}.0.layer_norm.weight"),
    *_attention("self_attention", f"{_E}.0.SelfAttention"),
    R.copy("pre_mlp_norm/scale", f"{_E}.1.layer_norm.weight"),
    *_mlp(f"{_E}.1.DenseReluDense"),
]
DECODER_LAYER = [
    R.copy("pre_self_attention_norm/scale", f"{_D}.0.layer_norm.weight"),
    *_attention("self_attention", f"{_D}.0.SelfAttention"),
    R.copy("pre_cross_attention_norm/scale", f"{_D}.1.layer_norm.weight"),
    *_attention("cross_attention", f"{_D}.1.EncDecAttention"),
    R.copy("pre_mlp_norm/scale", f"{_D}.2.layer_norm.weight"),
    *_mlp(f"{_D}.2.DenseReluDense"),
]


def slots(paths: dict, names: set | None) -> list[R.Slot]:
  """`paths`: our leaf paths -> shapes; `names`: the checkpoint's tensors (None: export)."""
  bias = "block.0.layer.0.SelfAttention.relative_attention_bias.weight"
  plain = [R.copy("token_embedder/embedding", "shared.weight"),
           R.copy("encoder_relative_bias/embedding", f"encoder.{bias}"),
           R.copy("decoder_relative_bias/embedding", f"decoder.{bias}"),
           R.copy("encoder_norm/scale", "encoder.final_layer_norm.weight"),
           R.copy("decoder_norm/scale", "decoder.final_layer_norm.weight")]
  if "logits_projection/kernel" in paths:
    head = "lm_head.weight" if names is None or "lm_head.weight" in names else "shared.weight"
    plain.append(R.dense("logits_projection/kernel", head))
  return R.expand(paths, plain, [("encoder", ENCODER_LAYER), ("decoder", DECODER_LAYER)])


def hf_config(model, shapes: dict) -> dict:
  """config.json (T5ForConditionalGeneration) for a T5-shaped SimVLM (checked)."""
  text = model.lm  # models.simvlm.TextConfig
  layout = dict(position="relative", norm_type="rmsnorm", mlp_activation="geglu",
                use_bias=False)
  wrong = {k: getattr(text, k) for k, v in layout.items() if getattr(text, k) != v}
  if wrong:
    raise ConversionError(f"this model's text path is not T5-shaped ({wrong}; T5 v1.1 needs "
                          f"{layout}).")
  return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
          "vocab_size": text.vocab_size, "d_model": text.width,
          "d_kv": text.head_dim or text.width // text.num_heads, "d_ff": text.mlp_dim,
          "num_layers": text.encoder_layers, "num_decoder_layers": text.decoder_layers,
          "num_heads": text.num_heads,
          "relative_attention_num_buckets": text.relative_buckets,
          "relative_attention_max_distance": text.relative_max_distance,
          "feed_forward_proj": "gated-gelu", "layer_norm_epsilon": 1e-6,
          "tie_word_embeddings": bool(text.tie_embeddings), "is_encoder_decoder": True,
          "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}
