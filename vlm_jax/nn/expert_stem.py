"""Convolutional stem that brings an expert's map (depth, normals, label embeddings, ...) to
the vision encoder's patch grid (Prismer, model/modules/vit.py `conv1[expert]`).

    resize (bilinear, align_corners) to grid * prod(strides)             Sequential index 0
    4 x [3x3 conv (no bias), norm, ReLU], channels width/8 -> width/4 -> width/2 -> width
                                                                         1-3, 4-6, 7-9, 10-12
    1x1 conv (no bias) to width                                          13

Prismer's dense maps use strides (2, 2, 2, 2) and label maps (2, 2, 1, 1): a label map is
resized less (to 4x the grid instead of 16x), because its 64 channels cost more per pixel.
The resize is torch's UpsamplingBilinear2d (align_corners=True, no antialiasing, also when
it shrinks a label map), so a released stem computes here what it computed there.

`norm`: "layer" (default) is a LayerNorm over channels at each pixel instead of the
reference's BatchNorm: no batch statistics (no mutable state in the shared train step,
identical train and eval behaviour, examples stay independent), as SimVLM's conv stem chose
GroupNorm. "batch" is the reference's BatchNorm2d (eps 1e-5) evaluated with its running
statistics (`norms.FrozenBatchNorm`): what Prismer's released checkpoints hold.

x [B, H, W, C] -> [B, grid_h, grid_w, width] for any input resolution.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.nn import norms

Dtype = Any
DENSE_STRIDES = (2, 2, 2, 2)
LABEL_STRIDES = (2, 2, 1, 1)
NORMS = ("layer", "batch")


def _interpolation(n: int, out: int) -> np.ndarray:
  """[out, n] bilinear weights with corners aligned: output i samples input i*(n-1)/(out-1)
  (torch's align_corners=True), so each row holds 1 - frac and frac at its two neighbours."""
  position = np.arange(out) * ((n - 1) / max(out - 1, 1))
  return np.maximum(0.0, 1.0 - np.abs(position[:, None] - np.arange(n)[None]))


def resize_align_corners(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear resize of x [B, H, W, C] to [B, *size, C] with corner pixels aligned, one matmul
  per spatial axis (as jax.image.resize runs its half-pixel resize)."""
  height, width = x.shape[1:3]
  if height != size[0]:
    x = jnp.einsum("BHWC,hH->BhWC", x, _interpolation(height, size[0]).astype(x.dtype),
                   precision=jax.lax.Precision.HIGHEST)
  if width != size[1]:
    x = jnp.einsum("BHWC,wW->BHwC", x, _interpolation(width, size[1]).astype(x.dtype),
                   precision=jax.lax.Precision.HIGHEST)
  return x


class ExpertStem(nn.Module):
  width: int
  strides: tuple[int, ...] = DENSE_STRIDES
  norm: str = "layer"  # layer | batch (module docstring)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _conv(self, features, kernel, stride, name):
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=[(kernel // 2, kernel // 2)] * 2, use_bias=False, dtype=self.dtype,
                   param_dtype=self.param_dtype, name=name,
                   kernel_init=nn.with_logical_partitioning(
                       nn.initializers.he_normal(), (None, None, "conv_in", "conv_out")))

  def _norm(self, name):
    if self.norm == "layer":
      return norms.LayerNorm(1e-5, True, self.dtype, self.param_dtype, name=name)
    return norms.FrozenBatchNorm(1e-5, self.dtype, self.param_dtype, name=name)

  @nn.compact
  def __call__(self, x, grid: tuple[int, int]):
    if len(self.strides) != 4 or self.width % 8:
      raise ValueError(f"ExpertStem: 4 strides and a width divisible by 8 expected, got "
                       f"strides={self.strides}, width={self.width}.")
    if self.norm not in NORMS:
      raise ValueError(f"config.model.vision.expert_stem_norm={self.norm!r}: expected one of "
                       f"{NORMS}.")
    scale = math.prod(self.strides)
    x = resize_align_corners(x.astype(self.dtype), (grid[0] * scale, grid[1] * scale))
    for i, (divisor, stride) in enumerate(zip((8, 4, 2, 1), self.strides)):
      x = self._conv(self.width // divisor, 3, stride, f"conv_{i}")(x)
      x = jax.nn.relu(self._norm(f"norm_{i}")(x))
    return self._conv(self.width, 1, 1, "proj")(x)
