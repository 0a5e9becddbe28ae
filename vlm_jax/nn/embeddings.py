"""Token embeddings (with `attend` for tied logits), learned position embeddings, rotary,
and splicing other embeddings (visual tokens) into a token sequence."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def lm_embedding_init(features: int):
  """N(0, 1/features): rows of a decoder LM's table (and rows added to it). Used as tied
  logits, a row's dot product with a final-normed hidden state (unit variance per feature)
  then has unit variance, so a random-init LM starts near ln(vocab) instead of the hundreds
  N(0, 1) rows give (their logits have standard deviation sqrt(features)); the flax default
  for nn.Embed, close to the N(0, 0.02) of GPT-2 / LLaMA / MPT at widths 1024-4096."""
  return nn.initializers.normal(stddev=features ** -0.5)


class Embed(nn.Module):
  """Token embedding table [vocab, embed]; `attend` gives logits with the same table.

  The default N(0, 1) is T5's table, whose tied logits are scaled by width**-0.5
  (SimVLM); decoder LMs, whose tied logits are not scaled, use `lm_embedding_init`.
  """
  num_embeddings: int
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  embedding_init: Any = nn.initializers.normal(stddev=1.0)

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(self.embedding_init, ("vocab", "embed")),
        (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, ids):
    x = jnp.take(self.embedding, ids, axis=0).astype(self.dtype)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))

  def attend(self, x):
    logits = jnp.einsum("BTD,VD->BTV", x.astype(self.dtype), self.embedding.astype(self.dtype))
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


class PositionEmbedding(nn.Module):
  """Learned additive position embedding of shape `shape + (features,)`.

  `shape` is (length,) for text or (height, width) for an image grid; the parameter is named
  `pos_embedding` either way.
  """
  shape: tuple[int, ...]
  features: int
  stddev: float = 0.02
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self) -> jax.Array:
    # A mesh axis may appear once per array, so a 2-D grid gets two distinct names.
    names = (("length",) if len(self.shape) == 1 else ("image_h", "image_w")) + ("embed",)
    return self.param("pos_embedding",
                      nn.with_logical_partitioning(nn.initializers.normal(self.stddev), names),
                      tuple(self.shape) + (self.features,), self.param_dtype)


def resize_2d_pos_embedding(pos_embedding: jax.Array, new_hw: tuple[int, int]) -> jax.Array:
  """Bilinearly interpolates a [h, w, D] grid embedding to [new_h, new_w, D] (fine-tuning at
  another resolution, importing weights trained at another patch grid)."""
  if tuple(pos_embedding.shape[:2]) == tuple(new_hw):
    return pos_embedding
  return jax.image.resize(pos_embedding, tuple(new_hw) + pos_embedding.shape[2:], "bilinear")


def apply_rotary(x: jax.Array, positions: jax.Array, max_wavelength: float = 10_000.0):
  """Rotary position embedding on x [B, T, N, H] (H even) at integer `positions` [B, T]."""
  half = x.shape[-1] // 2
  freq = max_wavelength ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions.astype(jnp.float32)[..., None, None] * freq  # [B, T, 1, H/2]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def splice(embeddings: jax.Array, inserted: jax.Array, positions: jax.Array,
           present: jax.Array) -> jax.Array:
  """Writes inserted [B, N, L, D] into embeddings [B, T, D] at positions [B, N] where
  present [B, N] is true (visual tokens overwriting their placeholder slots)."""
  put = jax.vmap(lambda e, v, p: jax.lax.dynamic_update_slice(e, v, (p, 0)))
  for n in range(inserted.shape[1]):
    written = put(embeddings, inserted[:, n].astype(embeddings.dtype), positions[:, n])
    embeddings = jnp.where(present[:, n, None, None], written, embeddings)
  return embeddings
