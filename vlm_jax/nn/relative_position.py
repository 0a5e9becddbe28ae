"""T5's relative position bias: a learned scalar per head and log-spaced distance bucket,
added to the attention logits (one table per stack, shared by all its layers).

Buckets (T5 / HF `_relative_position_bucket`): for a key at j and a query at i, d = j - i.
Bidirectional: half the buckets for d > 0, half for d <= 0, on |d|; causal: only d <= 0,
on -d. Within a half of n buckets, distances below n/2 get their own bucket, larger ones
share log-spaced buckets up to `max_distance` (then the last one).
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def relative_bucket(distance: jax.Array, bidirectional: bool, num_buckets: int,
                    max_distance: int) -> jax.Array:
  """Bucket ids (int32) for key-minus-query distances."""
  buckets = jnp.zeros_like(distance)
  if bidirectional:
    num_buckets //= 2
    buckets = buckets + (distance > 0).astype(jnp.int32) * num_buckets
    distance = jnp.abs(distance)
  else:
    distance = -jnp.minimum(distance, 0)
  exact = num_buckets // 2
  # max(., 1) keeps log() finite where the small branch is taken anyway.
  log_ratio = (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / exact)
               / math.log(max_distance / exact))
  large = exact + (log_ratio * (num_buckets - exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(distance < exact, distance, large)


class RelativePositionBias(nn.Module):
  num_heads: int
  bidirectional: bool
  num_buckets: int = 32
  max_distance: int = 128
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query_positions: jax.Array, key_positions: jax.Array | None) -> jax.Array:
    """query_positions [B|1, T], key_positions [S] or [B, S] (ints) -> bias [B|1, N, T, S].

    key_positions None (decoding with a KV cache): 0..S-1 over the cache, S being the length
    of the first such call, the one that creates the cache (a 'cache' variable of that shape
    records it; only its shape is read, as callers may zero the cache collection).
    """
    if key_positions is None:
      slots = self.variable("cache", "key_slots", jnp.zeros, (query_positions.shape[-1],),
                            jnp.int32)
      key_positions = jnp.arange(slots.value.shape[0])
    table = self.param("embedding", nn.with_logical_partitioning(
        nn.initializers.normal(1.0), (None, "heads")), (self.num_buckets, self.num_heads),
        self.param_dtype)
    key_positions = jnp.asarray(key_positions).reshape((-1, key_positions.shape[-1]))
    distance = key_positions[:, None, :] - query_positions[:, :, None]  # [B, T, S]
    buckets = relative_bucket(distance.astype(jnp.int32), self.bidirectional,
                              self.num_buckets, self.max_distance)
    bias = jnp.take(table.astype(jnp.float32), buckets, axis=0)  # [B, T, S, N]
    return jnp.transpose(bias, (0, 3, 1, 2))
