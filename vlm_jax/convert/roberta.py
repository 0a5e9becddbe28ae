"""RoBERTa (HF `RobertaForCausalLM` / `RobertaForMaskedLM`) <-> Prismer's decoder
(`vlm_jax.models.prismer.Prismer`: its RoBERTa params sit at the top level of the model).

    roberta.embeddings.word_embeddings.weight [V, D]         word_embedding (also the tied
                                                             logits, as RoBERTa's LM head)
    roberta.embeddings.position_embeddings.weight [514, D]   pos_embedding/pos_embedding
    roberta.embeddings.token_type_embeddings.weight [1, D]   token_type_embedding [D]
    roberta.embeddings.LayerNorm                             embed_norm
    roberta.encoder.layer.{i}.attention.self.{query,key,value}
                                                 decoder/<stack>/self_attention/{query,key,value}
    roberta.encoder.layer.{i}.attention.output.dense         decoder/<stack>/self_attention/out
    roberta.encoder.layer.{i}.attention.output.LayerNorm     decoder/<stack>/self_attention_norm
    roberta.encoder.layer.{i}.intermediate.dense             decoder/<stack>/mlp/wi
    roberta.encoder.layer.{i}.output.dense                   decoder/<stack>/mlp/wo
    roberta.encoder.layer.{i}.output.LayerNorm               decoder/<stack>/mlp_norm
    lm_head.dense / lm_head.layer_norm / lm_head.bias        lm_head_dense / lm_head_norm /
                                                             lm_head_bias

Prismer's new parts (cross-attention, its norm and the adaptor in every layer; the extra
output layer) are not in RoBERTa checkpoints: the family declares them new
(`Prismer.PRETRAINED_PARTS['lm']` in models/prismer.py). The `roberta.` prefix is optional
(RobertaModel-style names are read too). RoBERTa ties the output projection to the word embeddings, so `lm_head.decoder.*`
(written by older transformers as a copy) is ignored; the pooler is not used by a decoder.
Prismer positions start at `position_offset` = 2 (padding_idx + 1) for right-padded text,
which is RoBERTa's numbering of the real tokens.
"""
from vlm_jax.convert import rules as R
from vlm_jax.convert.checkpoint import ConversionError

NAME = "roberta"
MODEL_TYPES = ("roberta",)
IGNORE = (r"(roberta\.)?pooler\..*", r"(roberta\.)?embeddings\.position_ids",
          r"lm_head\.decoder\.(weight|bias)")
PREFIX = "roberta."


def _norm(ours, hf):
  return [R.copy(f"{ours}/scale", f"{hf}.weight"), R.copy(f"{ours}/bias", f"{hf}.bias")]


def _dense(ours, hf, in_axes=1):
  return [R.dense(f"{ours}/kernel", f"{hf}.weight", in_axes), R.vector(f"{ours}/bias", f"{hf}.bias")]


_L = "encoder.layer.{i}"
LAYER = [
    *_dense("self_attention/query", f"{_L}.attention.self.query"),
    *_dense("self_attention/key", f"{_L}.attention.self.key"),
    *_dense("self_attention/value", f"{_L}.attention.self.value"),
    *_dense("self_attention/out", f"{_L}.attention.output.dense", in_axes=2),
    *_norm("self_attention_norm", f"{_L}.attention.output.LayerNorm"),
    *_dense("mlp/wi", f"{_L}.intermediate.dense"),
    *_dense("mlp/wo", f"{_L}.output.dense"),
    *_norm("mlp_norm", f"{_L}.output.LayerNorm"),
]
TOKEN_TYPE = R.Rule(("token_type_embedding",), ("embeddings.token_type_embeddings.weight",),
                    lambda w, shapes: (w.reshape(shapes[0]),), lambda x: (x.reshape(1, -1),))


def slots(paths: dict, names: set | None) -> list[R.Slot]:
  """`paths`: our leaf paths -> shapes; `names`: the checkpoint's tensors (None: export)."""
  body = [R.copy("word_embedding", "embeddings.word_embeddings.weight"),
          R.copy("pos_embedding/pos_embedding", "embeddings.position_embeddings.weight"),
          TOKEN_TYPE, *_norm("embed_norm", "embeddings.LayerNorm")]
  prefix = PREFIX if names is None or any(n.startswith(PREFIX) for n in names) else ""
  head = [*_dense("lm_head_dense", "lm_head.dense"), *_norm("lm_head_norm", "lm_head.layer_norm"),
          R.copy("lm_head_bias", "lm_head.bias")]
  return R.expand(paths, R.prefixed(body, prefix) + head,
                  [("decoder", R.prefixed(LAYER, prefix))])


def hf_config(model, shapes: dict) -> dict:
  """config.json (RobertaForCausalLM) for Prismer's decoder (its fields and shapes)."""
  if "token_type_embedding" not in shapes:
    raise ConversionError("roberta export expects Prismer's decoder params (word_embedding, "
                          "decoder/..., lm_head_*).")
  lm = model.lm  # models.prismer.RobertaConfig
  return {"architectures": ["RobertaForCausalLM"], "model_type": "roberta",
          "is_decoder": True, "vocab_size": lm.vocab_size, "hidden_size": lm.width,
          "num_hidden_layers": lm.num_layers, "num_attention_heads": lm.num_heads,
          "intermediate_size": lm.mlp_dim, "hidden_act": "gelu",
          "max_position_embeddings": lm.max_text_length, "type_vocab_size": 1,
          "layer_norm_eps": 1e-5, "pad_token_id": lm.position_offset - 1,
          "bos_token_id": 0, "eos_token_id": 2, "tie_word_embeddings": True}
