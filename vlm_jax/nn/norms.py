"""LayerNorm and RMSNorm with logically partitioned scale/bias; statistics in float32. Also
FrozenBatchNorm: BatchNorm evaluated with stored running statistics.

Both go through one normalisation with a hand-written gradient (`normalize`): it stores the
input and the per-token statistics, and the backward is the closed form

    dx = rstd * (g*s - mean(g*s) - xhat * mean(g*s * xhat))     (RMSNorm: no mean(g*s) term)

in one pass after two reductions, with scale/bias gradients only for parameters that are
differentiated (frozen norms skip them). Autodiff of the forward formula stored more
intermediates and made XLA:CPU several more passes over each [tokens, width] activation.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def _stats(x32, center: bool, epsilon: float):
  mean = x32.mean(-1, keepdims=True) if center else None
  centred = x32 - mean if center else x32
  rstd = jax.lax.rsqrt(jnp.square(centred).mean(-1, keepdims=True) + epsilon)
  return mean, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _normalize(x, scale, bias, center, epsilon):
  x32 = x.astype(jnp.float32)
  mean, rstd = _stats(x32, center, epsilon)
  xhat = ((x32 - mean) if center else x32) * rstd
  return xhat * scale.astype(jnp.float32) + bias.astype(jnp.float32)


def _normalize_fwd(x, scale, bias, center, epsilon):
  x32 = x.value.astype(jnp.float32)
  mean, rstd = _stats(x32, center, epsilon)
  xhat = ((x32 - mean) if center else x32) * rstd
  y = xhat * scale.value.astype(jnp.float32) + bias.value.astype(jnp.float32)
  # () / None mark which gradients are wanted (static pytree structure, not values).
  wanted = tuple(() if arg.perturbed else None for arg in (x, scale, bias))
  return y, (x.value, mean, rstd, scale.value, wanted)


def _normalize_bwd(center, epsilon, residuals, g):
  del epsilon
  x, mean, rstd, scale, (want_dx, want_dscale, want_dbias) = residuals
  if isinstance(g, jax.custom_derivatives.SymbolicZero):
    return None, None, None
  x32 = x.astype(jnp.float32)
  xhat = ((x32 - mean) if center else x32) * rstd
  lead = tuple(range(x.ndim - 1))
  dx = dscale = dbias = None
  if want_dx is not None:
    gs = g * scale.astype(jnp.float32)
    inner = gs - xhat * jnp.mean(gs * xhat, -1, keepdims=True)
    if center:
      inner = inner - jnp.mean(gs, -1, keepdims=True)
    dx = (rstd * inner).astype(x.dtype)
  if want_dscale is not None:
    dscale = jnp.sum(g * xhat, lead).astype(scale.dtype)
  if want_dbias is not None:
    dbias = jnp.sum(g, lead).astype(scale.dtype)
  return dx, dscale, dbias


_normalize.defvjp(_normalize_fwd, _normalize_bwd, symbolic_zeros=True)


def normalize(x, scale, bias=None, *, center: bool = True, epsilon: float = 1e-6):
  """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, in float32 (RMSNorm:
  center=False, no mean removed). Returns float32."""
  if bias is None:
    bias = jnp.zeros((), scale.dtype)
  return _normalize(x, scale, bias, center, epsilon)


class LayerNorm(nn.Module):
  epsilon: float = 1e-6
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (features,), self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                        (features,), self.param_dtype)
    return normalize(x, scale, bias, center=True, epsilon=self.epsilon).astype(self.dtype)


class RMSNorm(nn.Module):
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (features,), self.param_dtype)
    return normalize(x, scale, center=False, epsilon=self.epsilon).astype(self.dtype)


class FrozenBatchNorm(nn.Module):
  """BatchNorm over the last (channel) axis with its running statistics as constants:

      y = (x - mean) * rsqrt(var + epsilon) * scale + bias       (torch BatchNorm2d in eval())

  `mean` and `var` are parameters so that they travel with the checkpoint, shard and convert
  like the others, but they are statistics, not weights: the model applies them behind a
  stop-gradient and its family lists them in STATISTICS, which keeps them on the frozen side
  of the train state whatever config.frozen says (no gradient, no optimizer moments, no weight
  decay). As detectron2's FrozenBatchNorm2d: exact for inference of a network trained with
  BatchNorm, a standard choice for fine-tuning it, and no mutable `batch_stats` collection
  in the shared train step (examples stay independent, train and eval compute the same).
  """
  epsilon: float = 1e-5  # torch.nn.BatchNorm2d's default
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    param = lambda name, init: self.param(
        name, nn.with_logical_partitioning(init, ("embed",)), (x.shape[-1],), self.param_dtype)
    scale, bias = param("scale", nn.initializers.ones), param("bias", nn.initializers.zeros)
    mean = jax.lax.stop_gradient(param("mean", nn.initializers.zeros)).astype(jnp.float32)
    var = jax.lax.stop_gradient(param("var", nn.initializers.ones)).astype(jnp.float32)
    y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.epsilon)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


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
