"""Convolutional stem that brings an expert's map (depth, normals, label embeddings, ...) to
the vision encoder's patch grid (Prismer).

    resize (bilinear) to grid * prod(strides)
    4 x [3x3 conv (no bias), norm, ReLU], channels width/8 -> width/4 -> width/2 -> width
    1x1 conv (no bias) to width

Prismer's dense maps use strides (2, 2, 2, 2) and label maps (2, 2, 1, 1): a label map is
upsampled less (to 4x the grid instead of 16x), because its 64 channels cost more per pixel.
The norm is a LayerNorm over channels at each pixel instead of the reference's BatchNorm:
it has no batch statistics (no mutable state in the shared train step, identical train and
eval behaviour, examples stay independent), as SimVLM's conv stem chose GroupNorm.

x [B, H, W, C] -> [B, grid_h, grid_w, width] for any input resolution.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.nn import norms

Dtype = Any
DENSE_STRIDES = (2, 2, 2, 2)
LABEL_STRIDES = (2, 2, 1, 1)


class ExpertStem(nn.Module):
  width: int
  strides: tuple[int, ...] = DENSE_STRIDES
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _conv(self, features, kernel, stride, name):
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=[(kernel // 2, kernel // 2)] * 2, use_bias=False, dtype=self.dtype,
                   param_dtype=self.param_dtype, name=name,
                   kernel_init=nn.with_logical_partitioning(
                       nn.initializers.he_normal(), (None, None, "conv_in", "conv_out")))

  @nn.compact
  def __call__(self, x, grid: tuple[int, int]):
    if len(self.strides) != 4 or self.width % 8:
      raise ValueError(f"ExpertStem: 4 strides and a width divisible by 8 expected, got "
                       f"strides={self.strides}, width={self.width}.")
    scale = math.prod(self.strides)
    batch, channels = x.shape[0], x.shape[-1]
    x = jax.image.resize(x.astype(self.dtype),
                         (batch, grid[0] * scale, grid[1] * scale, channels), "bilinear")
    for i, (divisor, stride) in enumerate(zip((8, 4, 2, 1), self.strides)):
      x = self._conv(self.width // divisor, 3, stride, f"conv_{i}")(x)
      x = norms.LayerNorm(1e-5, True, self.dtype, self.param_dtype, name=f"norm_{i}")(x)
      x = jax.nn.relu(x)
    return self._conv(self.width, 1, 1, "proj")(x)
