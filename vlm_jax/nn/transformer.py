"""Pre-LN transformer layers and a layer stack that is scanned (or not) and rematerialised.

A layer is called as `layer(x, context, deterministic, decode)`: `context` is a tuple of the
arrays every layer shares (masks, encoder output), `deterministic` and `decode` are Python
bools. With `scan_layers=True` the stack is one `nn.scan` over a single layer whose params
carry a leading `layers` axis (param path `.../layers/...`); with `scan_layers=False` the
layers are `layers_0 .. layers_{n-1}`; the same weights give the same outputs either way
(stack the unscanned params on axis 0 to get the scanned ones).
"""
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.nn import attention as attention_lib
from vlm_jax.nn import mlp as mlp_lib
from vlm_jax.nn import norms

Dtype = Any
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example."""
  rate: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    kept = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(kept, x / keep, jnp.zeros_like(x))


class _LayerBase(nn.Module):
  num_heads: int
  head_dim: int
  mlp_dim: int
  num_kv_heads: int | None = None
  mlp_activation: str = "gelu"
  norm_type: str = "layernorm"
  norm_epsilon: float = 1e-6
  use_bias: bool = True
  use_rotary: bool = False
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  attention_impl: str = "xla"  # nn/fused_attention.py
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _norm(self, name):
    return norms.make_norm(self.norm_type, self.dtype, self.param_dtype, name=name,
                           epsilon=self.norm_epsilon)

  def _attention(self, name, use_rotary):
    return attention_lib.MultiHeadAttention(
        num_heads=self.num_heads, head_dim=self.head_dim, num_kv_heads=self.num_kv_heads,
        use_bias=self.use_bias, use_rotary=use_rotary, attention_impl=self.attention_impl,
        dtype=self.dtype, param_dtype=self.param_dtype, name=name)

  def _residual(self, x, branch, deterministic):
    branch = nn.Dropout(self.dropout_rate)(branch, deterministic=deterministic)
    branch = DropPath(self.drop_path_rate)(branch, deterministic=deterministic)
    return nn.with_logical_constraint(x + branch, ("batch", "length", "embed"))

  def _mlp(self, x, deterministic):
    h = mlp_lib.Mlp(self.mlp_dim, self.mlp_activation, use_bias=self.use_bias,
                    dropout_rate=self.dropout_rate, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="mlp")(self._norm("pre_mlp_norm")(x),
                                                              deterministic)
    return self._residual(x, h, deterministic)


class EncoderLayer(_LayerBase):
  """x + SelfAttn(LN(x)); x + MLP(LN(x)). context = (mask,) or (mask, bias): mask
  [B|1, 1|N, T, T]; bias (optional) added to the attention logits (T5 relative positions)."""

  @nn.compact
  def __call__(self, x, context, deterministic: bool = True, decode: bool = False):
    mask, bias = (tuple(context) + (None,))[:2]
    h = self._attention("self_attention", self.use_rotary)(
        self._norm("pre_attention_norm")(x), mask=mask, bias=bias)
    x = self._residual(x, h, deterministic)
    return self._mlp(x, deterministic)


class DecoderLayer(_LayerBase):
  """Causal self-attention, cross-attention to the encoder, MLP; all pre-LN.

  context = (encoded [B, S, D], self_mask [.., T, T] or None, cross_mask [.., T, S]) and
  optionally a self-attention logits bias [.., T, T] (T5 relative positions).
  With decode=True the self-attention uses the KV cache (it adds the causal mask itself) and
  the cross-attention caches the encoder's keys/values; `encoded` None then reuses them.
  """

  @nn.compact
  def __call__(self, x, context, deterministic: bool = True, decode: bool = False):
    encoded, self_mask, cross_mask, self_bias = (tuple(context) + (None,))[:4]
    h = self._attention("self_attention", self.use_rotary)(
        self._norm("pre_self_attention_norm")(x), mask=self_mask, decode=decode,
        bias=self_bias)
    x = self._residual(x, h, deterministic)
    h = self._attention("cross_attention", False)(
        self._norm("pre_cross_attention_norm")(x), encoded, mask=cross_mask, decode=decode,
        kv_from_cache=decode and encoded is None)
    x = self._residual(x, h, deterministic)
    return self._mlp(x, deterministic)


def _scan_body(layer, x, context, deterministic, decode):
  return layer(x, context, deterministic, decode), None


class LayerStack(nn.Module):
  """`num_layers` copies of `layer_cls(**layer_kwargs)`; see the module docstring."""
  layer_cls: Any
  layer_kwargs: Any  # a flax.core.FrozenDict of the layer's fields
  num_layers: int
  scan_layers: bool = True
  remat_policy: str = "none"

  @nn.compact
  def __call__(self, x, context, deterministic: bool = True, decode: bool = False):
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r}: expected one of "
                       f"{tuple(REMAT_POLICIES)}.")
    cls = self.layer_cls
    if self.remat_policy != "none":
      cls = nn.remat(cls, policy=REMAT_POLICIES[self.remat_policy],
                     prevent_cse=not self.scan_layers, static_argnums=(3, 4))
    kwargs = dict(self.layer_kwargs)
    if not self.scan_layers:
      for i in range(self.num_layers):
        x = cls(**kwargs, name=f"layers_{i}")(x, context, deterministic, decode)
      return x
    scanned = nn.scan(
        _scan_body,
        variable_axes={"params": 0, "cache": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
        length=self.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = scanned(cls(**kwargs, name="layers"), x, context, deterministic, decode)
    return x


def stack_unscanned_params(params: dict, num_layers: int) -> dict:
  """Maps a stack's params from `layers_0..layers_{n-1}` to the scanned `layers` layout."""
  per_layer = [params[f"layers_{i}"] for i in range(num_layers)]
  return {"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)}


def layer_stack(layer_cls, *, num_layers, scan_layers=True, remat_policy="none", name=None,
                **layer_kwargs) -> LayerStack:
  return LayerStack(layer_cls, flax.core.FrozenDict(layer_kwargs), num_layers, scan_layers,
                    remat_policy, name=name)
