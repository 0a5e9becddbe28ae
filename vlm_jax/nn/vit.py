"""Vision Transformer encoder: patch embedding, optional class token, pre-LN encoder stack.

Parameter layout (so CLIP / HF ViT weights can be imported by a converter):
  patch_embedding/kernel [p, p, C, D] (+ bias when `patch_bias`)   <- conv1 / patch proj
  cls [D]                                                          <- class_embedding
  pos_embedding/pos_embedding [1 + h*w or h*w, D]                  <- positional_embedding
  pre_norm/{scale,bias} (when `pre_norm`)                          <- ln_pre
  encoder/layers/... (scanned) or encoder/layers_i/...              <- transformer.resblocks
  encoder_norm/{scale,bias}                                        <- ln_post

`post_norm='class'` applies the final norm to the class token only and returns the other
tokens as the last layer left them: open_clip's token output before 2.23 (its pooled token
is normed, the tokens are not), which OpenFlamingo's resampler was trained on;
`post_norm='none'` has no final norm (CogAgent's towers).

EVA layouts (nn/eva.py; CogAgent's towers): `branch_norm='post'` normalises each branch's
output instead of its input (EVA2-CLIP as CogVLM ships it); `rotary_2d` (2-D rotary
positions on the patch tokens, rows/columns scaled to `rotary_reference_grid`), `sub_norm`
(LayerNorms inside attention and MLP) and `qkv_bias='qv'` give EVA-02. With the defaults
the layers are `transformer.Layer`s. `output_pos_embedding` adds a learned [h*w, D] to the
patch tokens of the output (both CogAgent towers' `pos_embed`):
  output_pos_embedding/pos_embedding [h*w, D]
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vlm_jax.nn import embeddings, eva, norms, transformer

Dtype = Any

# Sizes by name (width, depth, heads, MLP), as big_vision's `decode_variant`: ViT-Ti..H
# (Dosovitskiy et al.; Zhai et al.), EVA ViT-g (1408 wide, MLP 6144: MiniGPT-v2's), EVA2-CLIP-E
# (CogAgent's low-res encoder).
VARIANTS = {
    "Ti": (192, 12, 3, 768), "S": (384, 12, 6, 1536), "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096), "H": (1280, 32, 16, 5120), "g": (1408, 40, 16, 6144),
    "E": (1792, 64, 16, 15360),
}


def variant(name: str, **overrides) -> dict:
  """'L/14' -> ViT fields (width, depth, num_heads, mlp_dim, patch_size), then `overrides`
  (e.g. depth=39: MiniGPT-v2 drops EVA ViT-g's last layer)."""
  size, _, patch = name.partition("/")
  if size not in VARIANTS or not patch.isdigit():
    raise ValueError(f"ViT variant {name!r}: expected <size>/<patch> with size in "
                     f"{sorted(VARIANTS)}, e.g. 'L/14'.")
  width, depth, num_heads, mlp_dim = VARIANTS[size]
  return {**dict(width=width, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim,
                 patch_size=int(patch)), **overrides}


class ViT(nn.Module):
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  mlp_activation: str = "gelu"
  class_token: bool = False
  pre_norm: bool = False
  patch_bias: bool = True
  norm_epsilon: float = 1e-6  # CLIP: 1e-5
  post_norm: str = "all"  # all | class | none (see the module docstring)
  branch_norm: str = "pre"  # pre | post (nn/eva.py)
  rotary_2d: bool = False
  rotary_reference_grid: int = 16  # EVA-02's pretraining grid; 0: the image's own grid
  sub_norm: bool = False
  qkv_bias: str = "qkv"  # qkv | qv
  output_pos_embedding: bool = False
  scan_layers: bool = True
  remat_policy: str = "none"
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  attention_impl: str = "xla"  # nn/fused_attention.py
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, deterministic: bool = True):
    """images [B, H, W, C] -> tokens [B, (1 +) h*w, D] after the final norm."""
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", use_bias=self.patch_bias,
                dtype=self.dtype, param_dtype=self.param_dtype, name="patch_embedding",
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(), (None, None, "conv_in", "embed")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(
                    images.astype(self.dtype))
    batch, height, width = x.shape[:3]
    x = x.reshape(batch, -1, self.width)
    if self.class_token:
      cls = self.param("cls", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                       (self.width,), self.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, self.width)), x], 1)
    x = x + embeddings.PositionEmbedding((x.shape[1],), self.width,
                                         param_dtype=self.param_dtype,
                                         name="pos_embedding")().astype(x.dtype)
    if self.pre_norm:
      x = norms.LayerNorm(self.norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                          name="pre_norm")(x)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    layer_cls, eva_fields, context = self._layer_layout(height, width)
    x = transformer.layer_stack(
        layer_cls, num_layers=self.depth, scan_layers=self.scan_layers,
        remat_policy=self.remat_policy, name="encoder", num_heads=self.num_heads,
        head_dim=self.width // self.num_heads, mlp_dim=self.mlp_dim,
        mlp_activation=self.mlp_activation, norm_epsilon=self.norm_epsilon,
        dropout_rate=self.dropout_rate,
        drop_path_rate=self.drop_path_rate, attention_impl=self.attention_impl,
        dtype=self.dtype, param_dtype=self.param_dtype, **eva_fields)(x, context, deterministic)
    x = self._final_norm(x)
    if self.output_pos_embedding:
      prefix = int(self.class_token)
      pos = embeddings.PositionEmbedding((height * width,), self.width,
                                         param_dtype=self.param_dtype,
                                         name="output_pos_embedding")()
      x = jnp.concatenate([x[:, :prefix], x[:, prefix:] + pos.astype(x.dtype)], axis=1)
    return x

  def _layer_layout(self, height, width):
    """(layer class, its EVA fields, the layers' context): plain `transformer.Layer`s unless
    an EVA option is set."""
    fields = dict(branch_norm=self.branch_norm, rotary_2d=self.rotary_2d,
                  sub_norm=self.sub_norm, qkv_bias=self.qkv_bias)
    if fields == dict(branch_norm="pre", rotary_2d=False, sub_norm=False, qkv_bias="qkv"):
      return transformer.Layer, {}, transformer.LayerContext()
    positions = None
    if self.rotary_2d:
      positions = eva.grid_positions(height, width, self.rotary_reference_grid)
    return (eva.EvaLayer, dict(fields, prefix_tokens=int(self.class_token)),
            transformer.LayerContext(positions=positions))

  def _final_norm(self, x):
    if self.post_norm == "none":
      return x
    norm = norms.LayerNorm(self.norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="encoder_norm")
    if self.post_norm == "class":
      return jnp.concatenate([norm(x[:, :1]), x[:, 1:]], axis=1)
    if self.post_norm != "all":
      raise ValueError(f"post_norm={self.post_norm!r}: expected 'all', 'class' or 'none'.")
    return norm(x)
