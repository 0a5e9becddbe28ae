"""Flamingo's GATED XATTN-DENSE block and its interleaved-media mask.

    y = y + tanh(attn_gate) * XAttn(q = LN(y), kv = visual tokens)
    y = y + tanh(ff_gate)   * FFW(LN(y))
with scalar gates initialised to 0, so a freshly inserted block is the identity and the
frozen LM it sits in computes exactly what it computed before.

Media mask (OpenFlamingo's `MaskedCrossAttention`): media item n has its `<image>` token at
`media_positions[n]`; token t sees the visual tokens of the most recent present item whose
position is <= t (so the `<image>` token sees its own image), or, with
`only_immediate=False`, of every present item at or before t. Tokens before any item see
nothing and get exactly zero attention output (attention.py zeroes fully masked rows), and
absent items (`media_present` 0, padded slots) are never attended. `media_segment_mask`
gives the only_immediate mask as segment ids (the form fused kernels take; present items
have distinct positions, each its own `<image>` token). Packed rows (several documents per
row) pass `segment_ids`: an item is then visible only inside its own document.

Parameters (OpenFlamingo `GatedCrossAttentionBlock` names in brackets):
    attn_gate [], ff_gate []                                    [attn_gate, ff_gate]
    attention_norm/{scale,bias}                                 [attn.norm]
    attention/{query,key,value,out}/kernel (no biases)          [attn.to_q, to_kv (split), to_out]
    mlp_norm/{scale,bias}, mlp/{wi,wo}/kernel (no biases)       [ff.0, ff.1, ff.3]
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.nn import attention as attention_lib
from vlm_jax.nn import mlp as mlp_lib
from vlm_jax.nn import norms
from vlm_jax.nn import segment_mask

Dtype = Any


def media_visibility(media_positions: jax.Array, media_present: jax.Array, length: int,
                     only_immediate: bool = True,
                     segment_ids: jax.Array | None = None) -> jax.Array:
  """[B, T, N] bool: token t may attend to media item n.

  media_positions [B, N] int: index of item n's `<image>` token; media_present [B, N]: 1 for
  real items (absent items' positions are ignored). segment_ids [B, T] (packed rows, several
  documents per row: data/packing.py): an item belongs to the document of its `<image>`
  token and is visible only to that document's tokens, so "most recent" is within the
  document and a document's tokens before its own first image see nothing.
  """
  present = media_present > 0
  positions = media_positions.astype(jnp.int32)
  before = present[:, None, :] & (positions[:, None, :] <= jnp.arange(length)[None, :, None])
  if segment_ids is not None:
    media_segments = jnp.take_along_axis(segment_ids, jnp.clip(positions, 0, length - 1), axis=1)
    before &= media_segments[:, None, :] == segment_ids[:, :, None]
  if not only_immediate:
    return before
  latest = jnp.max(jnp.where(before, positions[:, None, :], -1), axis=-1, keepdims=True)
  return before & (positions[:, None, :] == latest)


def media_segment_mask(media_positions, media_present, length: int, tokens_per_media: int,
                       segment_ids=None) -> segment_mask.SegmentMask:
  """The only_immediate mask in factored form (what the fused kernels take): a token's id is
  the index of the latest present item at or before it (-1: none, so it sees nothing), a
  visual token's id the index of its item (-2 for absent items: never seen)."""
  visible = media_visibility(media_positions, media_present, length, only_immediate=True,
                             segment_ids=segment_ids)
  items = jnp.arange(visible.shape[-1], dtype=jnp.int32)
  q_ids = jnp.max(jnp.where(visible, items, -1), axis=-1)
  kv_ids = jnp.where(media_present > 0, items, -2)
  return segment_mask.SegmentMask(q_ids, jnp.repeat(kv_ids, tokens_per_media, axis=-1))


def media_attention_mask(media_positions, media_present, length: int, tokens_per_media: int,
                         only_immediate: bool = True, segment_ids=None) -> jax.Array:
  """[B, 1, T, N * L] bool mask over the flattened visual tokens [B, N * L, D]."""
  visible = media_visibility(media_positions, media_present, length, only_immediate,
                             segment_ids)
  return jnp.repeat(visible, tokens_per_media, axis=-1)[:, None]


class GatedCrossAttentionDense(nn.Module):
  """x [B, T, D], media [B, S, Dv] (flattened visual tokens), mask [B, 1, T, S] or a
  SegmentMask (media_segment_mask) -> [B, T, D].

  decode=True caches the media keys/values; media None then reuses them (decoding steps).
  """
  num_heads: int = 8
  head_dim: int = 64
  mlp_ratio: int = 4
  mlp_activation: str = "gelu"  # OpenFlamingo; the paper uses squared ReLU
  norm_epsilon: float = 1e-5
  attention_impl: str = "xla"  # nn/fused_attention.py
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _gate(self, name):
    return self.param(name, nn.with_logical_partitioning(nn.initializers.zeros, ()), (),
                      self.param_dtype)

  def _norm(self, name):
    return norms.LayerNorm(self.norm_epsilon, True, self.dtype, self.param_dtype, name=name)

  @nn.compact
  def __call__(self, x, media, mask, decode: bool = False):
    width = x.shape[-1]
    h = attention_lib.MultiHeadAttention(
        self.num_heads, self.head_dim, use_bias=False, attention_impl=self.attention_impl,
        dtype=self.dtype, param_dtype=self.param_dtype, name="attention")(
            self._norm("attention_norm")(x), None if media is None else media.astype(self.dtype),
            mask=mask, decode=decode, kv_from_cache=decode and media is None)
    x = x + jnp.tanh(self._gate("attn_gate")).astype(x.dtype) * h.astype(x.dtype)
    h = mlp_lib.Mlp(self.mlp_ratio * width, self.mlp_activation, use_bias=False,
                    dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(
                        self._norm("mlp_norm")(x))
    x = x + jnp.tanh(self._gate("ff_gate")).astype(x.dtype) * h.astype(x.dtype)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))
