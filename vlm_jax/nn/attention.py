"""Multi-head self-/cross-attention with boolean masks, rotary or ALiBi, grouped-query and a KV
cache.

Shapes use dimension letters: B batch, T query length, S key length, D model width,
N query heads, K key/value heads (N % K == 0), H head dim.

Masks are boolean, broadcastable to [B, N, T, S], or a `segment_mask.SegmentMask` (segment
ids + causal: the form the fused kernels take, `attention_impl` = splash | cudnn; see
nn/fused_attention.py). A query row whose mask is all False outputs exactly zero (softmax
over nothing is defined as no contribution), never NaN and never a uniform average over
padding.

Decoding (`decode=True`) with a mutable `cache` collection:
  self-attention: the first call, with the collection empty, creates zero buffers shaped like
    that call's keys (call it with the maximum length); later calls append their T keys at
    `cache_index` and attend causally over the cache, so a step-by-step decode equals the
    full causal forward.
  cross-attention: a call with `inputs_kv` stores the projected keys/values; a later call
    with `kv_from_cache=True` (and no `inputs_kv`) attends to them, so decoding steps do not
    re-project the encoder output or media at every token.

ALiBi (`use_alibi`, MPT's variant): head n adds slope_n * (key position - query position) to
its logits, slopes from `alibi_slopes` (MPT's `gen_slopes` with `alibi_bias_max`). MPT
writes the bias as slope_n * (key index - (S - 1)), which differs from ours by a constant
per query row, so the softmax is the same. Positions are the rotary ones (default 0..T-1,
or the cache index onwards); a decoding cache stores its keys' positions beside them, so a
generated token after a padded prompt sees the prompt at its true distance.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.nn import embeddings
from vlm_jax.nn import fused_attention
from vlm_jax.nn import linear
from vlm_jax.nn import segment_mask

Dtype = Any


def causal_mask(length: int) -> jax.Array:
  """[1, 1, T, T] lower-triangular mask."""
  return jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]


def padding_mask(query_valid: jax.Array | None, key_valid: jax.Array) -> jax.Array:
  """[B, 1, T, S] from per-token validity [B, T] and [B, S] (query_valid None: all valid)."""
  mask = key_valid.astype(jnp.bool_)[:, None, None, :]
  if query_valid is not None:
    mask = mask & query_valid.astype(jnp.bool_)[:, None, :, None]
  return mask


def decoder_self_mask(length: int, token_mask=None, key_mask=None, decode: bool = False):
  """A causal decoder's self-attention mask. Full forward: causal, padding (token_mask
  [B, T]) masked as keys, as a SegmentMask (the fused kernels' form). Decoding with the KV
  cache (causal by construction): only the cache slots' validity key_mask [B, S], or None."""
  if decode:
    return None if key_mask is None else padding_mask(None, key_mask)
  return segment_mask.causal(length, None if token_mask is None else token_mask > 0)


def alibi_slopes(num_heads: int, bias_max: float = 8.0) -> jax.Array:
  """[N] slopes 2^(-bias_max * k / n) for k = 1..n, n = num_heads rounded up to a power of
  two; for other head counts MPT interleaves (odd k first) and keeps the first N."""
  padded = 2 ** math.ceil(math.log2(num_heads))
  slopes = 2.0 ** (-jnp.arange(1, padded + 1, dtype=jnp.float32) * (bias_max / padded))
  if padded != num_heads:
    slopes = jnp.concatenate([slopes[1::2], slopes[::2]])[:num_heads]
  return slopes


def alibi_bias(num_heads: int, query_positions: jax.Array, key_positions: jax.Array,
               bias_max: float = 8.0) -> jax.Array:
  """[B, N, T, S] ALiBi logits bias from positions [B, T] (queries) and [B, S] (keys)."""
  distance = (key_positions[:, None, :] - query_positions[:, :, None]).astype(jnp.float32)
  return alibi_slopes(num_heads, bias_max)[None, :, None, None] * distance[:, None]


class Projection(nn.Module):
  """x [..., *in] -> [..., *features] with kernel [*in, *features] (nn.DenseGeneral's layout).

  Unlike nn.DenseGeneral, the initialiser makes the kernel in its final rank, so its logical
  axis names can be applied (under a mesh, DenseGeneral boxes a flattened 2-D kernel first,
  which breaks rank-3 sharding constraints). Fan-in/out are those of the flattened matrix.
  """
  features: tuple[int, ...]
  num_in_axes: int
  kernel_axes: tuple[str | None, ...]
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    in_shape = x.shape[x.ndim - self.num_in_axes:]
    features = tuple(self.features)
    flat = (math.prod(in_shape), math.prod(features))
    init = lambda key, shape, dtype: self.kernel_init(key, flat, dtype).reshape(shape)
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.kernel_axes),
                        tuple(in_shape) + features, self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    y = linear.contract(x, kernel, self.num_in_axes)
    if self.use_bias:
      bias_axes = self.kernel_axes[self.num_in_axes:]
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, bias_axes),
                        features, self.param_dtype)
      y = y + bias.astype(y.dtype)
    return y


class MultiHeadAttention(nn.Module):
  num_heads: int
  head_dim: int
  num_kv_heads: int | None = None  # None: = num_heads; fewer: grouped-query attention
  use_bias: bool = True
  use_rotary: bool = False
  rotary_max_wavelength: float = 10_000.0
  attention_impl: str = "xla"  # xla | splash | cudnn: nn/fused_attention.py
  use_alibi: bool = False  # MPT's ALiBi (self-attention; see the module docstring)
  alibi_bias_max: float = 8.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _proj(self, heads, name):
    return Projection((heads, self.head_dim), 1, ("embed", "heads", "kv"), self.use_bias,
                      self.dtype, self.param_dtype, name=name)

  @nn.compact
  def __call__(self, inputs_q, inputs_kv=None, mask=None, *, positions=None,
               decode: bool = False, bias=None, kv_from_cache: bool = False):
    """inputs_q [B, T, D]; inputs_kv [B, S, D] (None: self-attention); mask boolean.

    kv_from_cache (cross-attention, decode=True): the keys/values a previous decode call
    with `inputs_kv` stored in the cache.

    bias: float added to the attention logits, broadcastable to [B, N, T, S] (S = the cache
    length when decoding), e.g. T5's relative position bias.

    positions [B, T]: rotary / ALiBi positions of self-attention tokens (default 0..T-1, or
    the cache index onwards when decoding).
    """
    self_attention = inputs_kv is None and not kv_from_cache
    batch, q_len, features = inputs_q.shape
    num_kv = self.num_kv_heads or self.num_heads
    if self.num_heads % num_kv:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={num_kv}.")

    q = self._proj(self.num_heads, "query")(inputs_q)  # BTNH
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    if kv_from_cache:
      if not (decode and self.has_variable("cache", "cross_key")) or inputs_kv is not None:
        raise ValueError("kv_from_cache needs decode=True, no inputs_kv, and a cache filled "
                         "by an earlier decode call with inputs_kv.")
      k, v = (self.get_variable("cache", n) for n in ("cross_key", "cross_value"))
    else:
      kv_inputs = inputs_q if self_attention else inputs_kv
      k = self._proj(num_kv, "key")(kv_inputs)  # BSKH
      v = self._proj(num_kv, "value")(kv_inputs)
      k = nn.with_logical_constraint(k, ("batch", "length", "heads", "kv"))
      v = nn.with_logical_constraint(v, ("batch", "length", "heads", "kv"))
      if decode and not self_attention and self.is_mutable_collection("cache"):
        self.put_variable("cache", "cross_key", k)
        self.put_variable("cache", "cross_value", v)

    cache_ready = decode and self.has_variable("cache", "cached_key")
    if (self.use_rotary or self.use_alibi) and not self_attention:
      raise ValueError("use_rotary / use_alibi are for self-attention.")
    if (self.use_rotary or self.use_alibi) and positions is None:
      start = self.get_variable("cache", "cache_index") if cache_ready else 0
      positions = jnp.broadcast_to(start + jnp.arange(q_len), (batch, q_len))
    if self.use_rotary:
      q = embeddings.apply_rotary(q, positions, self.rotary_max_wavelength)
      k = embeddings.apply_rotary(k, positions, self.rotary_max_wavelength)
    if self.use_alibi:
      key_positions = self._cache_positions(positions, cache_ready) if decode else positions
      alibi = alibi_bias(self.num_heads, positions, key_positions, self.alibi_bias_max)
      bias = alibi if bias is None else alibi + jnp.asarray(bias, jnp.float32)

    if decode and self_attention:
      k, v, mask = self._update_cache(k, v, mask, cache_ready)

    out = fused_attention.dot_product_attention(
        q, k.astype(q.dtype), v.astype(q.dtype), mask, bias, scale=self.head_dim ** -0.5,
        implementation=self.attention_impl, decode=decode, name="/".join(self.scope.path))
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
    return self._out_proj(features)(out)

  def _out_proj(self, features):
    return Projection((features,), 2, ("heads", "kv", "embed"), self.use_bias, self.dtype,
                      self.param_dtype, name="out")

  def _cache_positions(self, positions, cache_ready):
    """[B, S] positions of the cached keys, this call's written at the cache index."""
    cached = self.variable("cache", "cached_positions", jnp.zeros, positions.shape, jnp.int32)
    if not cache_ready:  # the call that creates the cache
      return positions
    index = self.get_variable("cache", "cache_index")
    cached.value = jax.lax.dynamic_update_slice(cached.value, positions.astype(jnp.int32),
                                                (0, index))
    return cached.value

  def _update_cache(self, k, v, mask, cache_ready):
    cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
    cache_index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
    if not cache_ready:  # the call that creates the cache: plain forward with the given mask
      return k, v, mask
    index, q_len, max_len = cache_index.value, k.shape[1], cached_key.value.shape[1]
    k = jax.lax.dynamic_update_slice(cached_key.value, k.astype(cached_key.value.dtype),
                                     (0, index, 0, 0))
    v = jax.lax.dynamic_update_slice(cached_value.value, v.astype(cached_value.value.dtype),
                                     (0, index, 0, 0))
    cached_key.value, cached_value.value = k, v
    cache_index.value = index + q_len
    causal = jnp.arange(max_len)[None, :] <= (index + jnp.arange(q_len))[:, None]  # [T, S]
    causal = causal[None, None]
    if isinstance(mask, segment_mask.SegmentMask):
      mask = mask.dense()
    return k, v, causal if mask is None else (jnp.asarray(mask, jnp.bool_) & causal)
