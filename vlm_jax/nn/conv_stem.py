"""ResNet conv stem: root + the first three ResNet stages, then a 1x1 projection to width.

root 7x7/2 conv + 3x3/2 max-pool, stage1 (stride 1), stage2 (stride 2), stage3 (stride 2) of
bottleneck blocks: overall stride 16, so 224 px -> 14x14 tokens (SimVLM, ViT-hybrid).
Convolutions are weight-standardised and followed by GroupNorm (BiT): no batch statistics,
so no mutable state and per-example independence (padding examples cannot leak). Channel
widths: stage i has bottleneck width `width * 2**i` and output `4 * width * 2**i`
(width=64 is ResNet-50's 256/512/1024).
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.nn import transformer

Dtype = Any


class StdConv(nn.Module):
  """Conv2D (no bias) with per-output-channel weight standardisation; NHWC / HWIO."""
  features: int
  kernel_size: int
  strides: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(nn.initializers.he_normal(),
                                               (None, None, "conv_in", "conv_out")),
        (k, k, x.shape[-1], self.features), self.param_dtype)
    w = kernel.astype(jnp.float32)
    mean = w.mean(axis=(0, 1, 2), keepdims=True)
    var = w.var(axis=(0, 1, 2), keepdims=True)
    w = (w - mean) * jax.lax.rsqrt(var + 1e-5)
    return jax.lax.conv_general_dilated(
        x.astype(self.dtype), w.astype(self.dtype), (self.strides, self.strides), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _group_norm(channels, dtype, param_dtype, name, zero_scale=False):
  scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
  return nn.GroupNorm(
      num_groups=math.gcd(32, channels), epsilon=1e-5, dtype=dtype, param_dtype=param_dtype,
      name=name,
      scale_init=nn.with_logical_partitioning(scale_init, ("conv_out",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 (x4) with a projected shortcut when the shape changes.

  The last GroupNorm scale starts at zero, so every block starts as (a projection of) the
  identity, which makes training from scratch stable.
  """
  width: int
  strides: int = 1
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    out = 4 * self.width
    conv = lambda f, k, s, n: StdConv(f, k, s, self.dtype, self.param_dtype, name=n)
    gn = lambda c, n, z=False: _group_norm(c, self.dtype, self.param_dtype, n, z)
    residual = x
    if x.shape[-1] != out or self.strides != 1:
      residual = gn(out, "proj_norm")(conv(out, 1, self.strides, "proj_conv")(x))
    y = nn.relu(gn(self.width, "norm1")(conv(self.width, 1, 1, "conv1")(x)))
    y = nn.relu(gn(self.width, "norm2")(conv(self.width, 3, self.strides, "conv2")(y)))
    y = gn(out, "norm3", True)(conv(out, 1, 1, "conv3")(y))
    y = transformer.DropPath(self.drop_path_rate)(y, deterministic)
    return nn.relu(residual + y)


class ConvStem(nn.Module):
  """images [B, H, W, C] -> tokens [B, H/16, W/16, out_features]."""
  out_features: int
  width: int = 64
  stage_blocks: tuple[int, ...] = (3, 4, 6)
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, deterministic: bool = True):
    x = StdConv(self.width, 7, 2, self.dtype, self.param_dtype, name="root_conv")(images)
    x = nn.relu(_group_norm(self.width, self.dtype, self.param_dtype, "root_norm")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for stage, num_blocks in enumerate(self.stage_blocks):
      for block in range(num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = Bottleneck(self.width * 2 ** stage, strides, self.drop_path_rate, self.dtype,
                       self.param_dtype, name=f"stage{stage + 1}_block{block + 1}")(
                           x, deterministic)
    x = nn.Dense(self.out_features, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="projection",
                 kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                          ("conv_in", "embed")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(x)
    return nn.with_logical_constraint(x, ("batch", None, None, "embed"))
