"""LoRA (arXiv 2106.09685) on attention projections, and merging it into the base weights.

A LoRA projection keeps the base weight as an ordinary param with the same path and shape as
the plain projection (`.../query/kernel` [D, N, H]) and adds two params beside it:

    lora_a [D, r]      random (kaiming-uniform, as PEFT)       logical ("embed", None)
    lora_b [r, N, H]   zeros, so a fresh LoRA model equals the base model

    y = x W (+ b) + dropout(x) A B * (alpha / r)

So a base checkpoint loads into a LoRA model unchanged, the trainer freezes the base weights
with a regex such as `lm/(?!.*/lora_[ab]$).*` (fullmatch), and `merge_lora` folds B·A back
into W for export: the merged tree has exactly the plain model's params.

Which projections get LoRA is a config tuple of names among `query`, `key`, `value` (the
paper's `q_proj`, `k_proj`, `v_proj`). The attention output projection is built inline in
`MultiHeadAttention.__call__` (not through `_proj`), so it cannot take LoRA yet.
"""
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.nn import attention
from vlm_jax.nn import linear

Dtype = Any
LORA_TARGETS = ("query", "key", "value")
# kaiming_uniform(a=sqrt(5)) as torch/PEFT initialise lora_A: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_LORA_A_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _flat_init(init):
  """Initialiser for a [D, *features] kernel computed on its [D, prod(features)] matrix, as
  nn.DenseGeneral does, so fan-in/out match the plain projection's."""
  def fn(key, shape, dtype=jnp.float32):
    return init(key, (shape[0], math.prod(shape[1:])), dtype).reshape(shape)
  return fn


class LoraDense(nn.Module):
  """x [..., D] -> [..., *features] with a frozen-able base kernel plus a rank-r update."""
  features: tuple[int, ...]
  rank: int
  alpha: float
  dropout_rate: float = 0.0
  deterministic: bool = True  # a field: MultiHeadAttention calls projections with x only
  use_bias: bool = False
  kernel_axes: tuple[str | None, ...] = ("embed", "heads", "kv")
  kernel_init: Any = nn.initializers.lecun_normal()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.rank <= 0:
      raise ValueError(f"LoRA rank={self.rank}: must be positive.")
    features = tuple(self.features)
    width = x.shape[-1]
    kernel = self.param("kernel", nn.with_logical_partitioning(
        _flat_init(self.kernel_init), self.kernel_axes), (width,) + features, self.param_dtype)
    lora_a = self.param("lora_a", nn.with_logical_partitioning(
        _LORA_A_INIT, (self.kernel_axes[0], None)), (width, self.rank), self.param_dtype)
    lora_b = self.param("lora_b", nn.with_logical_partitioning(
        nn.initializers.zeros, (None,) + tuple(self.kernel_axes[1:])),
        (self.rank,) + features, self.param_dtype)
    x = x.astype(self.dtype)
    y = linear.contract(x, kernel.astype(self.dtype), 1)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(
          nn.initializers.zeros, tuple(self.kernel_axes[1:])), features, self.param_dtype)
      y = y + bias.astype(self.dtype)
    h = nn.Dropout(self.dropout_rate)(x, deterministic=self.deterministic)
    h = linear.contract(h, lora_a.astype(self.dtype), 1)  # [..., r]
    update = linear.contract(h, lora_b.astype(self.dtype), 1)
    return y + update * (self.alpha / self.rank)


class LoraMultiHeadAttention(attention.MultiHeadAttention):
  """`MultiHeadAttention` whose projections named in `lora_targets` are `LoraDense`."""
  lora_targets: tuple[str, ...] = ()
  lora_rank: int = 8
  lora_alpha: float = 8.0
  lora_dropout_rate: float = 0.0
  deterministic: bool = True

  def _proj(self, heads, name):
    unknown = set(self.lora_targets) - set(LORA_TARGETS)
    if unknown:
      raise ValueError(f"lora_targets {sorted(unknown)}: expected names among {LORA_TARGETS}.")
    if name not in self.lora_targets:
      return super()._proj(heads, name)
    return LoraDense(
        (heads, self.head_dim), rank=self.lora_rank, alpha=self.lora_alpha,
        dropout_rate=self.lora_dropout_rate, deterministic=self.deterministic,
        use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name)


def lora_delta(lora_a: jax.Array, lora_b: jax.Array, alpha: float) -> jax.Array:
  """B·A·(alpha/r) shaped like the kernel; leading axes (a scanned `layers` axis) batch."""
  rank, lead = lora_a.shape[-1], lora_a.shape[:-2]
  if lora_b.shape[:len(lead) + 1] != lead + (rank,):
    raise ValueError(f"lora_a {lora_a.shape} and lora_b {lora_b.shape} disagree on the rank "
                     "or the leading (layers) axes.")
  features = lora_b.shape[len(lead) + 1:]
  b = lora_b.reshape(lead + (rank, math.prod(features)))
  delta = jnp.matmul(lora_a.astype(jnp.float32), b.astype(jnp.float32))
  return (delta * (alpha / rank)).reshape(lead + (lora_a.shape[-2],) + features)


def merge_lora(params: Mapping, alpha: float) -> dict:
  """Returns `params` with every {kernel, lora_a, lora_b} folded into `kernel` and the LoRA
  params removed: the param tree of the same model built without LoRA (for export)."""
  def merge(tree):
    if not isinstance(tree, Mapping):
      return tree
    out = {k: merge(v) for k, v in tree.items() if k not in ("lora_a", "lora_b")}
    if ("lora_a" in tree) != ("lora_b" in tree) or ("lora_a" in tree and "kernel" not in tree):
      raise ValueError(f"malformed LoRA sub-tree with keys {sorted(tree)}: expected kernel, "
                       "lora_a and lora_b together.")
    if "lora_a" in tree:
      kernel = tree["kernel"]
      delta = lora_delta(tree["lora_a"], tree["lora_b"], alpha)
      out["kernel"] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    return out
  return merge(params)
