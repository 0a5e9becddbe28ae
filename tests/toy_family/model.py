"""A toy captioner: the image, patch-embedded and mean-pooled into one token, takes the
placeholder slot at `image_positions` in front of the caption; a small decoder LM predicts
the caption. Batch (data.py writes it):

    images [B, 1, H, W, 3]  image_mask [B, 1]  image_positions [B, 1]
    tokens, targets, loss_mask, token_mask [B, T]  loss_weight [B]
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.models import registry
from vlm_jax.nn import attention, decoder_lm, embeddings
from vlm_jax.nn import flops as F


class ToyCaptioner(nn.Module):
  lm: decoder_lm.DecoderLM
  patch_size: int = 8

  def setup(self):
    p = self.patch_size
    self.patches = nn.Conv(self.lm.width, (p, p), strides=(p, p), padding="VALID")

  def embed_inputs(self, batch):
    x = self.lm.embed(batch["tokens"])
    image = self.patches(batch["images"][:, 0]).mean(axis=(1, 2))  # [B, D]
    x = embeddings.splice(x, image[:, None, None], batch["image_positions"],
                          batch["image_mask"] > 0)
    return x, batch["token_mask"], None

  def embed_generated(self, tokens):
    return self.lm.embed(tokens)

  def generation_extra(self, extra, last):
    del last
    return extra

  def __call__(self, batch, deterministic: bool = True):
    x, token_mask, _ = self.embed_inputs(batch)
    return self.lm.logits(self.lm.trunk(x, token_mask=token_mask, deterministic=deterministic))


def build(model_config) -> ToyCaptioner:
  registry.check_keys(model_config, ("lm", "patch_size"))
  lm = registry.part(decoder_lm.DecoderLM, model_config, "lm", **registry.common(model_config))
  return ToyCaptioner(lm=lm, patch_size=model_config.patch_size)


def batch_spec(data_config, batch_size: int) -> dict:
  size, length = data_config.image_size, data_config.sequence_length
  f32, i32 = jnp.float32, jnp.int32
  shapes = {"images": ((batch_size, 1, size, size, 3), f32), "image_mask": ((batch_size, 1), f32),
            "image_positions": ((batch_size, 1), i32), "tokens": ((batch_size, length), i32),
            "targets": ((batch_size, length), i32), "loss_mask": ((batch_size, length), f32),
            "token_mask": ((batch_size, length), f32), "loss_weight": ((batch_size,), f32)}
  return {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}


def flops_parts(config, causal_half=True) -> dict:
  lm, t = config.model.lm, config.data.sequence_length
  p, size = config.model.patch_size, config.data.image_size
  return {"patches": F.dense((size // p) ** 2, p * p * 3, lm.width),
          "lm": lm.num_layers * F.decoder_lm_layer(t, lm, causal_half),
          "logits": F.dense(t, lm.width, lm.vocab_size)}


def attention_masks(config, batch, example: int = 0) -> dict:
  valid = jnp.asarray(batch["token_mask"][example:example + 1]) > 0
  mask = attention.causal_mask(valid.shape[1]) & attention.padding_mask(None, valid)
  return {"LM self-attention": np.asarray(mask[0, 0])}
