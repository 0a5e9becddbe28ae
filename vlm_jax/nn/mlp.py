"""Transformer feed-forward block: GELU (exact), quick-GELU (CLIP), SwiGLU, GeGLU (T5 v1.1's
gated-GELU, tanh approximation) or squared-ReLU. Gated ones: act(wi(x)) * wi_gate(x).
`hidden_norm_epsilon` adds a LayerNorm on the hidden activations before `wo` (EVA-02's
sub-LN, `ffn_ln`)."""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.nn import linear, norms

Dtype = Any
ACTIVATIONS = ("gelu", "quick_gelu", "swiglu", "geglu", "squared_relu")
_SQRT_HALF = 0.5 ** 0.5
_INV_SQRT_2PI = (2 * math.pi) ** -0.5


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU x * Phi(x), Phi from erf as PyTorch computes it (jax.nn.gelu uses erfc).

  Why not jax.nn.gelu(approximate=False): XLA:CPU evaluates its erfc piecewise, and
  autodiff stores erfc and exp(-x^2/2) from the forward, so each MLP made three passes over
  its [tokens, mlp] activations forward plus the backward's. Here the forward is one pass
  and the backward recomputes Phi and phi from the stored input in the pass that applies
  the gradient (1 / 2 fewer passes; tests/test_nn_blocks.py checks value and gradient).
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * _SQRT_HALF))


def _gelu_fwd(x):
  return gelu(x), x


def _gelu_bwd(x, g):
  cdf = 0.5 * (1.0 + jax.lax.erf(x * _SQRT_HALF))
  pdf = _INV_SQRT_2PI * jnp.exp(-0.5 * x * x)
  return (g * (cdf + x * pdf),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


class Mlp(nn.Module):
  hidden_dim: int
  activation: str = "gelu"
  use_bias: bool = True
  dropout_rate: float = 0.0
  hidden_norm_epsilon: float | None = None  # None: no sub-LN before wo
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
      h = gelu(h)
    elif self.activation == "quick_gelu":  # OpenAI CLIP
      h = h * jax.nn.sigmoid(1.702 * h)
    elif self.activation == "squared_relu":
      h = jnp.square(jax.nn.relu(h))
    else:
      h = nn.silu(h) if self.activation == "swiglu" else nn.gelu(h, approximate=True)
      h = h * self._dense(self.hidden_dim, ("embed", "mlp"), "wi_gate")(x)
    if self.hidden_norm_epsilon is not None:
      h = norms.LayerNorm(self.hidden_norm_epsilon, self.use_bias, self.dtype, self.param_dtype,
                          name="hidden_norm")(h)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    return self._dense(features, ("mlp", "embed"), "wo")(h)
