"""Perceiver Resampler: a fixed number of learned latents cross-attend to a variable set of
input tokens (Flamingo's visual resampler; Prismer's Experts Resampler).

Each layer:  latents += Attn(q = norm_l(latents), kv = [norm_x(x) ; norm_l(latents)])
             latents += MLP(norm(latents))
and a final norm. Keys/values include the latents themselves, as both papers do, so a latent
always has something to attend to: padded input tokens (`token_mask` 0) are never attended,
and an input that is all padding yields finite latents.

Flamingo / OpenFlamingo: separate norms for x and latents, no biases, GELU (OpenFlamingo) or
squared ReLU (paper), learned time embeddings per video frame (`num_frames` > 0).
Prismer: biased attention (torch.nn.MultiheadAttention), squared-ReLU MLP, and likewise
separate norms for x and latents, so the same layer serves both (`use_bias`,
`mlp_activation`, `final_norm` select the variant).

Shapes: x [B, F, V, D] (F frames of V tokens; F = 1 for an image) -> [B, num_latents, D].
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vlm_jax.nn import attention as attention_lib
from vlm_jax.nn import mlp as mlp_lib
from vlm_jax.nn import norms

Dtype = Any


class PerceiverLayer(nn.Module):
  num_heads: int
  head_dim: int
  mlp_dim: int
  mlp_activation: str = "gelu"
  use_bias: bool = False
  norm_epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _norm(self, name):
    return norms.LayerNorm(self.norm_epsilon, True, self.dtype, self.param_dtype, name=name)

  @nn.compact
  def __call__(self, x, latents, mask):
    """x [B, S, D], latents [B, L, D], mask [B, 1, 1, S + L] (True = attend)."""
    normed_latents = self._norm("latents_norm")(latents)
    kv = jnp.concatenate([self._norm("inputs_norm")(x), normed_latents], axis=1)
    latents = latents + attention_lib.MultiHeadAttention(
        self.num_heads, self.head_dim, use_bias=self.use_bias, dtype=self.dtype,
        param_dtype=self.param_dtype, name="attention")(normed_latents, kv, mask=mask)
    h = mlp_lib.Mlp(self.mlp_dim, self.mlp_activation, use_bias=self.use_bias, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="mlp")(self._norm("mlp_norm")(latents))
    return nn.with_logical_constraint(latents + h, ("batch", "length", "embed"))


class PerceiverResampler(nn.Module):
  num_latents: int = 64
  num_layers: int = 6
  num_heads: int = 8
  head_dim: int = 64
  mlp_ratio: int = 4
  mlp_activation: str = "gelu"
  use_bias: bool = False
  num_frames: int = 0  # > 0: learned time embeddings for up to this many video frames
  final_norm: bool = True
  norm_epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, token_mask=None):
    """x [B, F, V, D] -> latents [B, num_latents, D]; token_mask [B, F, V] (1 = real)."""
    batch, frames, tokens, width = x.shape
    if self.num_frames:
      if frames > self.num_frames:
        raise ValueError(f"{frames} frames, but the resampler has time embeddings for "
                         f"num_frames={self.num_frames}.")
      time = self.param("time_embedding",
                        nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                     (None, "embed")),
                        (self.num_frames, width), self.param_dtype)
      x = x + time[:frames, None, :].astype(x.dtype)
    x = x.reshape(batch, frames * tokens, width).astype(self.dtype)
    latents = self.param("latents",
                         nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                      (None, "embed")),
                         (self.num_latents, width), self.param_dtype)
    latents = jnp.broadcast_to(latents.astype(self.dtype), (batch, self.num_latents, width))
    key_valid = jnp.ones((batch, frames * tokens + self.num_latents), jnp.bool_)
    if token_mask is not None:
      key_valid = key_valid.at[:, :frames * tokens].set(
          token_mask.reshape(batch, frames * tokens).astype(jnp.bool_))
    mask = key_valid[:, None, None, :]
    for i in range(self.num_layers):
      latents = PerceiverLayer(self.num_heads, self.head_dim, self.mlp_ratio * width,
                               self.mlp_activation, self.use_bias, self.norm_epsilon,
                               self.dtype, self.param_dtype, name=f"layers_{i}")(
                                   x, latents, mask)
    if not self.final_norm:
      return latents
    return norms.LayerNorm(self.norm_epsilon, True, self.dtype, self.param_dtype,
                           name="final_norm")(latents)
