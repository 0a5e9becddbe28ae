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
is normed, the tokens are not), which OpenFlamingo's resampler was trained on.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vlm_jax.nn import embeddings, norms, transformer

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
  post_norm: str = "all"  # all | class (see the module docstring)
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
    batch = x.shape[0]
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
    x = transformer.layer_stack(
        transformer.Layer, num_layers=self.depth, scan_layers=self.scan_layers,
        remat_policy=self.remat_policy, name="encoder", num_heads=self.num_heads,
        head_dim=self.width // self.num_heads, mlp_dim=self.mlp_dim,
        mlp_activation=self.mlp_activation, norm_epsilon=self.norm_epsilon,
        dropout_rate=self.dropout_rate,
        drop_path_rate=self.drop_path_rate, attention_impl=self.attention_impl,
        dtype=self.dtype, param_dtype=self.param_dtype)(
            x, transformer.LayerContext(), deterministic)
    norm = norms.LayerNorm(self.norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="encoder_norm")
    if self.post_norm == "class":
      return jnp.concatenate([norm(x[:, :1]), x[:, 1:]], axis=1)
    if self.post_norm != "all":
      raise ValueError(f"post_norm={self.post_norm!r}: expected 'all' or 'class'.")
    return norm(x)
