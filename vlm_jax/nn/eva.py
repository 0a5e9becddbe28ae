"""EVA-family encoder layers: the layouts behind `vit.ViT`'s options `branch_norm`,
`rotary_2d`, `sub_norm` and `qkv_bias` (CogAgent's two vision towers use them).

  branch_norm='post'  EVA2-CLIP as CogVLM / CogAgent ship it (visual.py, the low-res tower):
                      no pre-norm; each branch's OUTPUT is normalised,
                      x + LN(Attn(x)); x + LN(MLP(x)) (post_attention_norm, post_mlp_norm).
  EVA-02 (EVA-CLIP's eva_vit_model.py; CogAgent's cross_visual.py, the high-res tower), pre-norm:
    rotary_2d         2-D rotary positions on the patch tokens (the class token gets none):
                      the first half of each head's features rotates by the patch's row, the
                      second half by its column, frequencies 10000^(-j / (H/4)), adjacent
                      feature pairs rotated together (EVA's `rotate_half`). Rows and columns
                      are scaled to a reference grid (EVA-02's `VisionRotaryEmbeddingFast`
                      with intp_freq: t = arange(n) / n * 16, the 224 px grid it was trained at).
    sub_norm          LayerNorms inside the branches: on the attention output before `out`
                      (inner_attn_ln -> self_attention/inner_norm) and on the MLP's hidden
                      activations before `wo` (ffn_ln -> mlp/hidden_norm).
    qkv_bias='qv'     biases on the query and value projections only (q_bias, v_bias).
"""
from typing import Any

import einops
import flax.linen as nn
import jax.numpy as jnp

from vlm_jax.nn import attention as attention_lib
from vlm_jax.nn import fused_attention, norms, transformer
from vlm_jax.nn import mlp as mlp_lib

Dtype = Any
QKV_BIASES = ("qkv", "qv")
BRANCH_NORMS = ("pre", "post")


def grid_positions(height: int, width: int, reference: int = 0):
  """[h*w, 2] float (row, column) of a row-major patch grid, scaled to a `reference` x
  `reference` grid (0: unscaled)."""
  rows = jnp.arange(height, dtype=jnp.float32) * ((reference or height) / height)
  cols = jnp.arange(width, dtype=jnp.float32) * ((reference or width) / width)
  return jnp.stack(jnp.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2)


def rotary_2d(x, positions):
  """x [B, T, N, H] rotated by positions [T, 2] (the module docstring's 2-D rotary)."""
  if x.shape[-1] % 4:
    raise ValueError(f"2-D rotary positions need a head dim divisible by 4, got {x.shape[-1]}.")
  quarter = x.shape[-1] // 4
  inverse = 10_000.0 ** (-jnp.arange(quarter, dtype=jnp.float32) / quarter)
  angles = jnp.concatenate([positions[:, :1] * inverse, positions[:, 1:] * inverse], -1)
  angles = jnp.repeat(angles, 2, axis=-1)[:, None, :]  # [T, 1, H]: pairs share an angle
  pairs = einops.rearrange(x.astype(jnp.float32), "... (d r) -> ... d r", r=2)
  swapped = einops.rearrange(jnp.stack([-pairs[..., 1], pairs[..., 0]], -1),
                             "... d r -> ... (d r)")
  return (x * jnp.cos(angles) + swapped * jnp.sin(angles)).astype(x.dtype)


class EvaAttention(nn.Module):
  """Self-attention with EVA's options; with the defaults it is `MultiHeadAttention`'s
  parameter layout (query/key/value/out with biases)."""
  num_heads: int
  head_dim: int
  qkv_bias: str = "qkv"  # qkv | qv
  sub_norm_epsilon: float | None = None  # None: no inner_norm
  prefix_tokens: int = 0  # leading tokens without rotary positions (a class token)
  attention_impl: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, positions=None, mask=None):
    """x [B, T, D]; positions [T - prefix_tokens, 2] (rotary_2d) or None; mask boolean."""
    if self.qkv_bias not in QKV_BIASES:
      raise ValueError(f"qkv_bias={self.qkv_bias!r}: expected one of {QKV_BIASES}.")
    project = lambda name: attention_lib.Projection(
        (self.num_heads, self.head_dim), 1, ("embed", "heads", "kv"), name[0] in self.qkv_bias,
        self.dtype, self.param_dtype, name=name)(x)
    q, k, v = project("query"), project("key"), project("value")
    if positions is not None:
      p = self.prefix_tokens
      q, k = (jnp.concatenate([t[:, :p], rotary_2d(t[:, p:], positions)], 1) for t in (q, k))
    out = fused_attention.dot_product_attention(
        q, k, v, mask, scale=self.head_dim ** -0.5, implementation=self.attention_impl,
        name="/".join(self.scope.path))
    if self.sub_norm_epsilon is not None:
      flat = out.reshape(out.shape[:2] + (-1,))
      out = norms.LayerNorm(self.sub_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                            name="inner_norm")(flat).reshape(out.shape)
    return attention_lib.Projection((x.shape[-1],), 2, ("heads", "kv", "embed"), True,
                                    self.dtype, self.param_dtype, name="out")(out)


class EvaLayer(transformer.Layer):
  """`transformer.Layer` with the module docstring's options. `context.positions`: the patch
  tokens' [T - prefix_tokens, 2] grid positions (rotary_2d)."""
  branch_norm: str = "pre"  # pre | post
  rotary_2d: bool = False
  sub_norm: bool = False
  qkv_bias: str = "qkv"
  prefix_tokens: int = 0

  def mlp_module(self, name: str = "mlp"):
    return mlp_lib.Mlp(self.mlp_dim, self.mlp_activation, use_bias=self.use_bias,
                       dropout_rate=self.dropout_rate,
                       hidden_norm_epsilon=self.norm_epsilon if self.sub_norm else None,
                       dtype=self.dtype, param_dtype=self.param_dtype, name=name)

  def _branch(self, x, sublayer, pre_name, post_name):
    if self.branch_norm not in BRANCH_NORMS:
      raise ValueError(f"branch_norm={self.branch_norm!r}: expected one of {BRANCH_NORMS}.")
    if self.branch_norm == "pre":
      return sublayer(self.norm(pre_name)(x))
    return self.norm(post_name)(sublayer(x))

  def attention_branch(self, x, context, deterministic, decode):
    if decode:
      raise ValueError("EvaLayer is an encoder layer: it does not decode.")
    attention = EvaAttention(
        self.num_heads, self.head_dim, self.qkv_bias,
        self.norm_epsilon if self.sub_norm else None, self.prefix_tokens, self.attention_impl,
        self.dtype, self.param_dtype, name="self_attention")
    positions = context.positions if self.rotary_2d else None
    return self._branch(x, lambda h: attention(h, positions, context.mask),
                        self.SELF_ATTENTION_NORM, "post_attention_norm")

  def mlp_branch(self, x, context, deterministic):
    del context
    return self._branch(x, lambda h: self.mlp_module()(h, deterministic), "pre_mlp_norm",
                        "post_mlp_norm")
