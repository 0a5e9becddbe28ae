"""A ViT over RGB patches plus the resampled tokens of expert maps (Prismer's vision side):
per-expert conv stems (`expert_stem.py`) bring each map to a patch grid, one position grid
serves every modality, an Experts Resampler (`resampler.py`) turns all expert tokens into a
fixed number of latents, and the encoder's layers carry bottleneck adaptors (`adaptor.py`).

Experts: dense maps (depth: 1 channel, normal: 3, edge: 1) and per-pixel label embeddings
(seg, obj_detection, ocr_detection); obj_detection adds learned per-instance embeddings.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.nn import adaptor as adaptor_lib
from vlm_jax.nn import embeddings, expert_stem, norms, resampler, transformer

DENSE_EXPERTS = {"depth": 1, "normal": 3, "edge": 1}  # name -> channels
LABEL_EXPERTS = ("seg", "obj_detection", "ocr_detection")  # per-pixel label embeddings
EXPERTS = tuple(DENSE_EXPERTS) + LABEL_EXPERTS
INSTANCES_KEY = "expert_obj_detection_instances"


def expert_key(name: str) -> str:
  return f"expert_{name}"


def check_experts(experts) -> tuple[str, ...]:
  experts = tuple(experts)
  unknown = [e for e in experts if e not in EXPERTS]
  if unknown or len(set(experts)) != len(experts):
    raise ValueError(f"experts={experts}: expected distinct names from {EXPERTS}.")
  return experts


def nearest_grid(ids: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """[B, H, W] ints -> [B, h, w]: the value at each output cell's centre (nearest)."""
  ids = jnp.asarray(ids)  # numpy batches (vlm-compile's example) cannot take traced indices
  height, width = ids.shape[1:3]
  rows = ((jnp.arange(grid[0]) + 0.5) * height / grid[0]).astype(jnp.int32)
  cols = ((jnp.arange(grid[1]) + 0.5) * width / grid[1]).astype(jnp.int32)
  return ids[:, rows][:, :, cols]


class VisionEmbedder(nn.Module):
  """RGB patches + resampled expert tokens: [B, h*w (+ num_latents with experts), D]."""
  width: int
  patch_size: int
  image_size: int  # the position grid is stored for this resolution
  experts: tuple[str, ...] = ()
  num_latents: int = 64
  resampler_layers: int = 4
  resampler_heads: int = 8
  num_instance_embeddings: int = 128
  expert_stem_norm: str = "layer"  # layer | batch (expert_stem.py)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def instance_embedding(self, instances, grid, deterministic):
    """Learned per-instance vectors [B, h, w, D]. Instance ids carry no meaning, so while
    training each example maps its ids through a fresh random permutation of the table (the
    reference draws a random row per instance); deterministic calls use id % table size."""
    table = self.param("instance_embedding",
                       nn.with_logical_partitioning(nn.initializers.normal(self.width ** -0.5),
                                                    (None, "embed")),
                       (self.num_instance_embeddings, self.width), self.param_dtype)
    ids = nearest_grid(instances, grid) % self.num_instance_embeddings
    if not deterministic:
      keys = jax.random.split(self.make_rng("dropout"), ids.shape[0])
      perms = jax.vmap(lambda k: jax.random.permutation(k, self.num_instance_embeddings))(keys)
      ids = jnp.take_along_axis(perms, ids.reshape(ids.shape[0], -1), axis=1).reshape(ids.shape)
    return jnp.take(table, ids, axis=0).astype(self.dtype)

  @nn.compact
  def __call__(self, images, expert_maps: dict, instances=None, deterministic=True):
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                dtype=self.dtype, param_dtype=self.param_dtype, name="patch_embedding",
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(), (None, None, "conv_in", "embed")))(
                        images.astype(self.dtype))
    batch, grid = x.shape[0], x.shape[1:3]
    side = self.image_size // p
    pos = embeddings.PositionEmbedding((side, side), self.width, stddev=self.width ** -0.5,
                                       param_dtype=self.param_dtype, name="pos_embedding")()
    x = x + embeddings.resize_2d_pos_embedding(pos, grid).astype(self.dtype)
    tokens = x.reshape(batch, -1, self.width)
    if not self.experts:
      return tokens
    expert_tokens = []
    for name in self.experts:
      maps = expert_maps[name]
      expert_grid = (maps.shape[1] // p, maps.shape[2] // p)
      strides = (expert_stem.LABEL_STRIDES if name in LABEL_EXPERTS
                 else expert_stem.DENSE_STRIDES)
      e = expert_stem.ExpertStem(self.width, strides, self.expert_stem_norm, self.dtype,
                                 self.param_dtype, name=f"stem_{name}")(maps, expert_grid)
      if name == "obj_detection":
        e = e + self.instance_embedding(instances, expert_grid, deterministic)
      # One position grid for every modality, interpolated to each expert's grid.
      e = e + embeddings.resize_2d_pos_embedding(pos, expert_grid).astype(self.dtype)
      expert_tokens.append(e.reshape(batch, -1, self.width))
    latents = resampler.PerceiverResampler(
        num_latents=self.num_latents, num_layers=self.resampler_layers,
        num_heads=self.resampler_heads, head_dim=self.width // self.resampler_heads,
        mlp_ratio=4, mlp_activation="squared_relu", use_bias=True, final_norm=False,
        dtype=self.dtype, param_dtype=self.param_dtype, name="resampler")(
            jnp.concatenate(expert_tokens, axis=1)[:, None])
    return jnp.concatenate([tokens, latents.astype(self.dtype)], axis=1)


class PrismerVision(nn.Module):
  """Adapted ViT over [RGB tokens ; expert latents]: LN_pre -> layers -> LN_post."""
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  image_size: int
  experts: tuple[str, ...] = ()
  num_latents: int = 64
  resampler_layers: int = 4
  resampler_heads: int = 8
  num_instance_embeddings: int = 128
  expert_stem_norm: str = "layer"  # layer | batch: Prismer's released stems (expert_stem.py)
  adaptor_ratio: int = 1
  mlp_activation: str = "quick_gelu"  # CLIP
  dropout_rate: float = 0.0
  scan_layers: bool = True
  remat_policy: str = "none"
  attention_impl: str = "xla"  # nn/fused_attention.py
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    self.embedder = VisionEmbedder(
        self.width, self.patch_size, self.image_size, tuple(self.experts), self.num_latents,
        self.resampler_layers, self.resampler_heads, self.num_instance_embeddings,
        self.expert_stem_norm, self.dtype, self.param_dtype)
    self.pre_norm = norms.LayerNorm(1e-6, True, self.dtype, self.param_dtype)
    self.encoder = transformer.layer_stack(
        adaptor_lib.AdaptedEncoderLayer, num_layers=self.depth, scan_layers=self.scan_layers,
        remat_policy=self.remat_policy, num_heads=self.num_heads,
        head_dim=self.width // self.num_heads, mlp_dim=self.mlp_dim,
        mlp_activation=self.mlp_activation, dropout_rate=self.dropout_rate,
        adaptor_ratio=self.adaptor_ratio, attention_impl=self.attention_impl, dtype=self.dtype,
        param_dtype=self.param_dtype)
    self.encoder_norm = norms.LayerNorm(1e-6, True, self.dtype, self.param_dtype)

  def embed_inputs(self, images, expert_maps: dict, instances=None, deterministic=True):
    return self.embedder(images, expert_maps, instances, deterministic)

  def __call__(self, images, expert_maps: dict, instances=None, deterministic=True):
    x = self.pre_norm(self.embed_inputs(images, expert_maps, instances, deterministic))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return self.encoder_norm(self.encoder(x, transformer.LayerContext(), deterministic))
