"""Bottleneck adaptor (Prismer): down -> squared ReLU -> up, with a LayerNorm and a residual.

    norm_late=False (vision):   x + up(relu(down(LN(x)))^2)
    norm_late=True  (language): LN(x + up(relu(down(x))^2))

`bottleneck_ratio` r gives a hidden size of width // r (the reference code uses r = 1).
The up-projection starts at zero, so a norm_late=False adaptor starts as the identity and a
frozen pretrained backbone keeps its function at initialisation (the language adaptor
starts as a LayerNorm). `AdaptedEncoderLayer` is the pre-LN encoder layer of
`nn/transformer.py` with an adaptor between self-attention and MLP, as in Prismer's ViT;
its other params keep transformer.Layer's names, so plain ViT weights load unchanged.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.nn import norms, transformer

Dtype = Any


class Adaptor(nn.Module):
  bottleneck_ratio: int = 1
  norm_late: bool = False
  norm_epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _dense(self, features, names, name, init):
    return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(init, names),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[-1:]))

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    if self.bottleneck_ratio < 1 or width % self.bottleneck_ratio:
      raise ValueError(f"adaptor bottleneck_ratio={self.bottleneck_ratio} must be >= 1 and "
                       f"divide the width {width}.")
    norm = norms.LayerNorm(self.norm_epsilon, True, self.dtype, self.param_dtype, name="norm")
    h = x if self.norm_late else norm(x)
    h = self._dense(width // self.bottleneck_ratio, ("embed", "mlp"), "down",
                    nn.initializers.xavier_uniform())(h)
    h = nn.with_logical_constraint(jnp.square(jax.nn.relu(h)), ("batch", "length", "mlp"))
    h = self._dense(width, ("mlp", "embed"), "up", nn.initializers.zeros)(h)
    out = norm(x + h) if self.norm_late else x + h
    return nn.with_logical_constraint(out, ("batch", "length", "embed"))


class AdaptedEncoderLayer(transformer.Layer):
  """x + SelfAttn(LN(x)); Adaptor(x); x + MLP(LN(x))."""
  adaptor_ratio: int = 1

  @nn.compact
  def __call__(self, x, context, deterministic: bool = True, decode: bool = False):
    x = self.self_attention_block(x, context, deterministic, decode)
    x = Adaptor(self.adaptor_ratio, norm_late=False, dtype=self.dtype,
                param_dtype=self.param_dtype, name="adaptor")(x)
    return self.mlp_block(x, context, deterministic)
