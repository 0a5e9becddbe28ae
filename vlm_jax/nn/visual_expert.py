"""CogVLM's visual expert: separate weights for image-token positions, shared attention.

Every token is projected by one of two weight sets chosen by a per-token flag `is_vision`
[B, T]: the language weights (named as a plain attention / MLP, so a pretrained LM loads
unchanged) or the vision expert's (`vision_<name>`). Attention itself is joint: queries,
keys and values of both kinds of token meet in one softmax, as in the reference.

With fixed shapes, both weight sets are applied to every token and the flag selects (the
reference gathers each kind of token first; same outputs, twice the projection FLOPs).

`ExpertAttention` adds vision_query, vision_key, vision_value, vision_out (Projection
layout) beside query/key/value/out. For the MLP, build a second `Mlp` beside the language
one and combine the two outputs with `select`.
"""
from typing import Any

import jax
import jax.numpy as jnp

from vlm_jax.nn import attention as attention_lib


def select(is_vision: jax.Array, vision: jax.Array, language: jax.Array) -> jax.Array:
  """Per token: `vision` where is_vision [B, T] is set, else `language` ([B, T, ...])."""
  flag = is_vision.astype(jnp.bool_).reshape(is_vision.shape + (1,) * (vision.ndim - 2))
  return jnp.where(flag, vision, language)


class ExpertAttention(attention_lib.MultiHeadAttention):
  """Self-attention whose q/k/v and output projections are routed by `is_vision` [B, T].

  Decoding with a KV cache works chunk by chunk as long as `is_vision` matches the chunk.
  """
  is_vision: Any = None  # [B, T] bool/0-1 array (required)

  def _routed(self, language, vision):
    if self.is_vision is None:
      raise ValueError("ExpertAttention needs is_vision [B, T].")
    return lambda x: select(self.is_vision, vision(x), language(x))

  def _proj(self, heads, name):
    vision = attention_lib.Projection(
        (heads, self.head_dim), 1, ("embed", "heads", "kv"), self.use_bias, self.dtype,
        self.param_dtype, name=f"vision_{name}")
    return self._routed(super()._proj(heads, name), vision)

  def _out_proj(self, features):
    vision = attention_lib.Projection(
        (features,), 2, ("heads", "kv", "embed"), self.use_bias, self.dtype,
        self.param_dtype, name="vision_out")
    return self._routed(super()._out_proj(features), vision)
