"""Transformer feed-forward block: GELU (exact), quick-GELU (CLIP), SwiGLU, GeGLU (T5 v1.1's
gated-GELU, tanh approximation) or squared-ReLU. Gated ones: act(wi(x)) * wi_gate(x)."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.nn import linear

Dtype = Any
ACTIVATIONS = ("gelu", "quick_gelu", "swiglu", "geglu", "squared_relu")


class Mlp(nn.Module):
  hidden_dim: int
  activation: str = "gelu"
  use_bias: bool = True
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _dense(self, features, names, name):
    return nn.Dense(features, use_bias=self.use_bias, dtype=self.dtype,
                    param_dtype=self.param_dtype, name=name, dot_general=linear.dot_general,
                    kernel_init=nn.with_logical_partitioning(
                        nn.initializers.xavier_uniform(), names),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[-1:]))

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"mlp activation {self.activation!r}: expected one of {ACTIVATIONS}.")
    features = x.shape[-1]
    h = self._dense(self.hidden_dim, ("embed", "mlp"), "wi")(x)
    if self.activation == "gelu":
      h = nn.gelu(h, approximate=False)
    elif self.activation == "quick_gelu":  # OpenAI CLIP
      h = h * jax.nn.sigmoid(1.702 * h)
    elif self.activation == "squared_relu":
      h = jnp.square(jax.nn.relu(h))
    else:
      h = nn.silu(h) if self.activation == "swiglu" else nn.gelu(h, approximate=True)
      h = h * self._dense(self.hidden_dim, ("embed", "mlp"), "wi_gate")(x)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    return self._dense(features, ("mlp", "embed"), "wo")(h)
