"""The transformer layer contract: one layer class family, one context, one stack.

Every layer is called as `layer(x, context, deterministic, decode)`: `context` is a
`LayerContext` of what all layers of a stack share (masks, positions, an encoder output,
family-specific `extra`), `deterministic` and `decode` are Python bools. `Layer` is the
pre-norm layer (ViT encoders, decoder-only LMs); its steps are methods a subclass overrides
(`norm`, `attention_module`, `mlp_module` factories; `attention_branch` / `mlp_branch`: norm +
sublayer; `self_attention_block` / `mlp_block`: branch + residual; `__call__`).
`CrossAttentionLayer` adds cross-attention to `context.encoded` between them (SimVLM's
decoder). Families subclass `Layer` for their own layers (CogAgent's cross-module, Flamingo's
gated groups, Prismer's post-LN RoBERTa layer and adapted ViT layer).

With `scan_layers=True` a stack is one `nn.scan` over a single layer whose params carry a
leading `layers` axis (param path `.../layers/...`); with `scan_layers=False` the layers are
`layers_0 .. layers_{n-1}`; the same weights give the same outputs either way (stack the
unscanned params on axis 0 to get the scanned ones).
"""
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.nn import attention as attention_lib
from vlm_jax.nn import lora
from vlm_jax.nn import mlp as mlp_lib
from vlm_jax.nn import norms

Dtype = Any
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class LayerContext(NamedTuple):
  """What every layer of a stack receives besides x (broadcast through the scan)."""
  mask: jax.Array | None = None  # self-attention, bool broadcastable to [B, N, T, T]
  positions: jax.Array | None = None  # [B, T] rotary/ALiBi positions (None: attention's default)
  bias: jax.Array | None = None  # added to self-attention logits (T5 relative positions)
  encoded: jax.Array | None = None  # [B, S, D] cross-attended (None while decoding: cached)
  cross_mask: jax.Array | None = None  # bool broadcastable to [B, N, T, S]
  extra: Any = None  # family-specific pytree (media, token types, high-res tokens, ...)


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


class Layer(nn.Module):
  """Pre-norm layer: x + Attn(norm(x)); x + MLP(norm(x)) (or both from x: parallel residual,
  GPT-NeoX). `use_bias` covers the projections and a LayerNorm's bias (MPT has neither)."""
  num_heads: int
  head_dim: int
  mlp_dim: int
  num_kv_heads: int | None = None  # None: = num_heads; fewer: grouped-query attention
  mlp_activation: str = "gelu"
  norm_type: str = "layernorm"
  norm_epsilon: float = 1e-6
  use_bias: bool = True
  use_rotary: bool = False
  rotary_max_wavelength: float = 10_000.0
  use_alibi: bool = False  # MPT's ALiBi (self-attention only; nn/attention.py)
  alibi_bias_max: float = 8.0
  parallel_residual: bool = False
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  lora_targets: tuple[str, ...] = ()  # e.g. ('query', 'value'); () = no LoRA params
  lora_rank: int = 8
  lora_alpha: float = 8.0
  lora_dropout_rate: float = 0.0
  attention_impl: str = "xla"  # xla | splash | cudnn: nn/fused_attention.py
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  SELF_ATTENTION_NORM = "pre_attention_norm"

  # --- module factories -------------------------------------------------------------------
  def norm(self, name):
    return norms.make_norm(self.norm_type, self.norm_epsilon, self.use_bias, self.dtype,
                           self.param_dtype, name=name)

  def attention_module(self, deterministic: bool, name: str = "self_attention",
                       positional: bool = True):
    """positional=False: no rotary / ALiBi (cross-attention has no relative positions)."""
    kwargs = dict(num_heads=self.num_heads, head_dim=self.head_dim,
                  num_kv_heads=self.num_kv_heads, use_bias=self.use_bias,
                  use_rotary=self.use_rotary and positional,
                  rotary_max_wavelength=self.rotary_max_wavelength,
                  use_alibi=self.use_alibi and positional, alibi_bias_max=self.alibi_bias_max,
                  attention_impl=self.attention_impl, dtype=self.dtype,
                  param_dtype=self.param_dtype, name=name)
    if self.lora_targets:
      return lora.LoraMultiHeadAttention(
          **kwargs, lora_targets=tuple(self.lora_targets), lora_rank=self.lora_rank,
          lora_alpha=self.lora_alpha, lora_dropout_rate=self.lora_dropout_rate,
          deterministic=deterministic)
    return attention_lib.MultiHeadAttention(**kwargs)

  def mlp_module(self, name: str = "mlp"):
    return mlp_lib.Mlp(self.mlp_dim, self.mlp_activation, use_bias=self.use_bias,
                       dropout_rate=self.dropout_rate, dtype=self.dtype,
                       param_dtype=self.param_dtype, name=name)

  # --- steps ------------------------------------------------------------------------------
  def residual(self, x, branch, deterministic):
    branch = nn.Dropout(self.dropout_rate)(branch, deterministic=deterministic)
    branch = DropPath(self.drop_path_rate)(branch, deterministic=deterministic)
    return nn.with_logical_constraint(x + branch, ("batch", "length", "embed"))

  def attention_branch(self, x, context: LayerContext, deterministic, decode):
    return self.attention_module(deterministic)(
        self.norm(self.SELF_ATTENTION_NORM)(x), mask=context.mask,
        positions=context.positions, bias=context.bias, decode=decode)

  def mlp_branch(self, x, context: LayerContext, deterministic):
    del context  # used by overrides (e.g. a visual expert's token types)
    return self.mlp_module()(self.norm("pre_mlp_norm")(x), deterministic)

  def self_attention_block(self, x, context, deterministic, decode):
    return self.residual(x, self.attention_branch(x, context, deterministic, decode),
                         deterministic)

  def mlp_block(self, x, context, deterministic):
    return self.residual(x, self.mlp_branch(x, context, deterministic), deterministic)

  @nn.compact
  def __call__(self, x, context: LayerContext, deterministic: bool = True,
               decode: bool = False):
    if self.parallel_residual:  # GPT-NeoX: x + Attn(ln1(x)) + MLP(ln2(x))
      h = self.attention_branch(x, context, deterministic, decode)
      return self.residual(self.residual(x, h, deterministic),
                           self.mlp_branch(x, context, deterministic), deterministic)
    x = self.self_attention_block(x, context, deterministic, decode)
    return self.mlp_block(x, context, deterministic)


class CrossAttentionLayer(Layer):
  """Self-attention (causal in a decoder), cross-attention to `context.encoded` under
  `context.cross_mask`, MLP; all pre-norm. While decoding, `encoded` None reads the
  cross-attention keys/values an earlier call cached."""
  SELF_ATTENTION_NORM = "pre_self_attention_norm"

  def cross_attention_block(self, x, context: LayerContext, deterministic, decode):
    h = self.attention_module(deterministic, "cross_attention", positional=False)(
        self.norm("pre_cross_attention_norm")(x), context.encoded, mask=context.cross_mask,
        decode=decode, kv_from_cache=decode and context.encoded is None)
    return self.residual(x, h, deterministic)

  @nn.compact
  def __call__(self, x, context: LayerContext, deterministic: bool = True,
               decode: bool = False):
    x = self.self_attention_block(x, context, deterministic, decode)
    x = self.cross_attention_block(x, context, deterministic, decode)
    return self.mlp_block(x, context, deterministic)


def layer_fields(layer: Layer) -> dict:
  """The `Layer` fields of `layer` (a subclass instance), e.g. to build a plain sublayer."""
  return {name: getattr(layer, name) for name in Layer.__dataclass_fields__
          if name not in ("parent", "name")}


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
  def __call__(self, x, context: LayerContext, deterministic: bool = True,
               decode: bool = False):
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
