"""LayerNorm and RMSNorm with logically partitioned scale/bias; statistics in float32."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any


class LayerNorm(nn.Module):
  epsilon: float = 1e-6
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * (var + self.epsilon) ** -0.5
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (features,), self.param_dtype)
    y = y * scale.astype(jnp.float32)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                        (features,), self.param_dtype)
      y = y + bias.astype(jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nn.Module):
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    x32 = x.astype(jnp.float32)
    y = x32 * (jnp.square(x32).mean(-1, keepdims=True) + self.epsilon) ** -0.5
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (features,), self.param_dtype)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


def make_norm(norm_type: str, epsilon: float = 1e-6, use_bias: bool = True,
              dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
              name: str | None = None):
  """The one norm factory: `norm_type` 'layernorm' (with a bias when `use_bias`, e.g. MPT's
  has none) or 'rmsnorm' (never a bias), a config string."""
  if norm_type == "layernorm":
    return LayerNorm(epsilon, use_bias, dtype=dtype, param_dtype=param_dtype, name=name)
  if norm_type == "rmsnorm":
    return RMSNorm(epsilon, dtype=dtype, param_dtype=param_dtype, name=name)
  raise ValueError(f"norm_type={norm_type!r}: expected 'layernorm' or 'rmsnorm'.")
