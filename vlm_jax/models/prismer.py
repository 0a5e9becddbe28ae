"""Prismer (arXiv 2303.02506): frozen experts' outputs as extra input modalities.

    images [B, 1, H, W, 3] -> patch conv (no bias) + 2-D position grid       -> RGB tokens
    expert maps (depth, normal, edge: dense; seg, obj_detection, ocr_detection: label
        embeddings) -> per-expert ExpertStem -> + the same position grid (interpolated to the
        expert's grid) (+ per-instance embeddings for obj_detection)    -> expert tokens
    Experts Resampler: 64 latents cross-attend to all expert tokens      -> 64 tokens
    ViT (frozen): LN_pre([RGB ; 64]) -> pre-LN layers, each with an adaptor after
        self-attention -> LN_post                                          -> encoded
    decoder: RoBERTa used causally (post-LN, learned positions, GELU, biases); every layer
        is self-attention (frozen) -> new cross-attention to `encoded` -> adaptor -> MLP
        (frozen); then one extra trainable layer (no cross-attention); RoBERTa's LM head
        (dense, GELU, LN, logits tied to the word embeddings + bias)
    -> logits [B, T, V]

PrismerZ = `experts=()`: RGB only, no stems and no resampler.

Batch (fixed shapes; written by `vlm_jax.data.prismer`):

    images                          [B, 1, H, W, 3] f32  pixels in [-1, 1]
    expert_<name>                   [B, He, We, C] f32   one per name in `experts`; C = 1
                                                         (depth, edge), 3 (normal) or the
                                                         label embedding size (seg,
                                                         obj_detection, ocr_detection);
                                                         dense maps in [-1, 1]
    expert_obj_detection_instances  [B, He, We] i32      instance id per pixel (255 =
                                                         background); with obj_detection
    tokens                          [B, T] i32           decoder inputs: BOS, caption[:-1]
    targets                         [B, T] i32           caption followed by EOS
    loss_mask                       [B, T] f32           1 where the target is real; also
                                                         marks valid decoder inputs
    loss_weight                     [B] f32              per-example weight

Freezing (`frozen_patterns(mode)`, the reference's `prepare_to_train`): 'freeze_lang_vision'
(pretraining) freezes the ViT layers except their adaptors, and the decoder layers'
self-attention and MLP (with their norms); 'freeze_vision' (fine-tuning) only the former;
'none' nothing. Stems, resampler, patch conv, position grid, LN_pre/LN_post, word and
position embeddings, cross-attention, adaptors, the output layer and the LM head train.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.nn import adaptor as adaptor_lib
from vlm_jax.nn import attention as attention_lib
from vlm_jax.nn import embeddings, expert_stem, norms, resampler, segment_mask, transformer
from vlm_jax.nn import mlp as mlp_lib

DENSE_EXPERTS = {"depth": 1, "normal": 3, "edge": 1}  # name -> channels
LABEL_EXPERTS = ("seg", "obj_detection", "ocr_detection")  # per-pixel label embeddings
EXPERTS = tuple(DENSE_EXPERTS) + LABEL_EXPERTS
INSTANCES_KEY = "expert_obj_detection_instances"
FREEZE_MODES = ("freeze_lang_vision", "freeze_vision", "freeze_lang", "none")
_VISION_FROZEN = r"vision/encoder/layers(_\d+)?/(?!adaptor/).*"
_LANG_FROZEN = (r"decoder/layers(_\d+)?/"
                r"(self_attention|self_attention_norm|mlp|mlp_norm)/.*")


def expert_key(name: str) -> str:
  return f"expert_{name}"


def check_experts(experts) -> tuple[str, ...]:
  experts = tuple(experts)
  unknown = [e for e in experts if e not in EXPERTS]
  if unknown or len(set(experts)) != len(experts):
    raise ValueError(f"experts={experts}: expected distinct names from {EXPERTS}.")
  return experts


def frozen_patterns(mode: str) -> tuple[str, ...]:
  """config.frozen for a reference freezing mode (fullmatch regexes over param paths)."""
  if mode not in FREEZE_MODES:
    raise ValueError(f"freeze={mode!r}: expected one of {FREEZE_MODES}.")
  return {"freeze_lang_vision": (_VISION_FROZEN, _LANG_FROZEN),
          "freeze_vision": (_VISION_FROZEN,), "freeze_lang": (_LANG_FROZEN,),
          "none": ()}[mode]


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
      e = expert_stem.ExpertStem(self.width, strides, self.dtype, self.param_dtype,
                                 name=f"stem_{name}")(maps, expert_grid)
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
        self.resampler_layers, self.resampler_heads, self.num_instance_embeddings, self.dtype,
        self.param_dtype)
    self.pre_norm = norms.LayerNorm(1e-6, True, self.dtype, self.param_dtype)
    self.encoder = transformer.layer_stack(
        adaptor_lib.AdaptedEncoderLayer, num_layers=self.depth, scan_layers=self.scan_layers,
        remat_policy=self.remat_policy, num_heads=self.num_heads,
        head_dim=self.width // self.num_heads, mlp_dim=self.mlp_dim,
        mlp_activation=self.mlp_activation, dropout_rate=self.dropout_rate,
        adaptor_ratio=self.adaptor_ratio, attention_impl=self.attention_impl,
        dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder_norm = norms.LayerNorm(1e-6, True, self.dtype, self.param_dtype)

  def embed_inputs(self, images, expert_maps: dict, instances=None, deterministic=True):
    return self.embedder(images, expert_maps, instances, deterministic)

  def __call__(self, images, expert_maps: dict, instances=None, deterministic=True):
    x = self.pre_norm(self.embed_inputs(images, expert_maps, instances, deterministic))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return self.encoder_norm(self.encoder(x, (None,), deterministic))


class RobertaLayer(nn.Module):
  """Post-LN RoBERTa layer, optionally with Prismer's cross-attention + adaptor.

      x = LN(x + SelfAttn(x))                        self_attention, self_attention_norm
      x = LN(x + CrossAttn(x, encoded))              cross_attention, cross_attention_norm
      x = Adaptor_late(x)                            adaptor
      x = LN(x + MLP(x))                             mlp, mlp_norm
  context = (encoded [B, S, Dv], self_mask, cross_mask).
  """
  num_heads: int
  head_dim: int
  mlp_dim: int
  cross_attention: bool = True
  adaptor_ratio: int = 1
  norm_epsilon: float = 1e-5
  dropout_rate: float = 0.0
  attention_impl: str = "xla"  # nn/fused_attention.py
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _post_ln(self, x, branch, name, deterministic):
    branch = nn.Dropout(self.dropout_rate)(branch, deterministic=deterministic)
    x = norms.LayerNorm(self.norm_epsilon, True, self.dtype, self.param_dtype, name=name)(
        x + branch)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))

  def _attention(self, name):
    return attention_lib.MultiHeadAttention(self.num_heads, self.head_dim, use_bias=True,
                                            attention_impl=self.attention_impl,
                                            dtype=self.dtype, param_dtype=self.param_dtype,
                                            name=name)

  @nn.compact
  def __call__(self, x, context, deterministic: bool = True, decode: bool = False):
    encoded, self_mask, cross_mask = context
    h = self._attention("self_attention")(x, mask=self_mask, decode=decode)
    x = self._post_ln(x, h, "self_attention_norm", deterministic)
    if self.cross_attention:
      h = self._attention("cross_attention")(x, encoded, mask=cross_mask, decode=decode,
                                             kv_from_cache=decode and encoded is None)
      x = self._post_ln(x, h, "cross_attention_norm", deterministic)
      x = adaptor_lib.Adaptor(self.adaptor_ratio, norm_late=True, norm_epsilon=self.norm_epsilon,
                              dtype=self.dtype, param_dtype=self.param_dtype, name="adaptor")(x)
    h = mlp_lib.Mlp(self.mlp_dim, "gelu", use_bias=True, dropout_rate=self.dropout_rate,
                    dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(x, deterministic)
    return self._post_ln(x, h, "mlp_norm", deterministic)


class Prismer(nn.Module):
  # `--config.init.lm=PATH` (a RoBERTa checkpoint, vlm_jax/convert/roberta.py) fills the
  # decoder; cross-attention, adaptors and the extra output layer keep their initialisation.
  PRETRAINED_PARTS = {"lm": {
      "path": "", "arch": "roberta", "exclude": (r"vision/.*",),
      "new": (r"decoder/layers(_\d+)?/(cross_attention|cross_attention_norm|adaptor)/.*",
              r"output_layer/.*")}}

  vocab_size: int
  # RoBERTa decoder
  width: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  max_text_length: int = 514  # rows of the position table (RoBERTa: 514)
  position_offset: int = 2  # RoBERTa's first position id (padding_idx + 1)
  # ViT
  vision_width: int = 768
  vision_layers: int = 12
  vision_heads: int = 12
  vision_mlp_dim: int = 3072
  patch_size: int = 16
  image_size: int = 224
  # experts
  experts: tuple[str, ...] = ()  # () = PrismerZ
  num_latents: int = 64
  resampler_layers: int = 4
  resampler_heads: int = 8
  num_instance_embeddings: int = 128
  adaptor_ratio: int = 1  # bottleneck ratio: adaptor hidden = width // adaptor_ratio
  # Which backbones config.frozen freezes (`frozen_patterns(freeze)`); the model only checks
  # it, vlm_jax.flops reads it to apply the frozen-part FLOPs rules.
  freeze: str = "freeze_lang_vision"
  dropout_rate: float = 0.0
  scan_layers: bool = True
  remat_policy: str = "none"
  attention_impl: str = "xla"  # xla | splash | cudnn (nn/fused_attention.py)
  dtype: str = "float32"
  param_dtype: str = "float32"

  def setup(self):
    check_experts(self.experts)
    frozen_patterns(self.freeze)
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    self.vision = PrismerVision(
        width=self.vision_width, depth=self.vision_layers, num_heads=self.vision_heads,
        mlp_dim=self.vision_mlp_dim, patch_size=self.patch_size, image_size=self.image_size,
        experts=tuple(self.experts), num_latents=self.num_latents,
        resampler_layers=self.resampler_layers, resampler_heads=self.resampler_heads,
        num_instance_embeddings=self.num_instance_embeddings, adaptor_ratio=self.adaptor_ratio,
        dropout_rate=self.dropout_rate, scan_layers=self.scan_layers,
        remat_policy=self.remat_policy, attention_impl=self.attention_impl, dtype=dtype,
        param_dtype=param_dtype)
    # RoBERTa's N(0, 0.02) init (nn.Embed's is N(0, 1)): the table also gives the tied logits.
    self.word_embedding = self.param(
        "word_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                       ("vocab", "embed")),
        (self.vocab_size, self.width), param_dtype)
    self.pos_embedding = embeddings.PositionEmbedding((self.max_text_length,), self.width,
                                                      param_dtype=param_dtype)
    self.token_type_embedding = self.param(
        "token_type_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                             ("embed",)),
        (self.width,), param_dtype)
    self.embed_norm = norms.LayerNorm(1e-5, True, dtype, param_dtype)
    self.embed_dropout = nn.Dropout(self.dropout_rate)
    layer_kwargs = dict(num_heads=self.num_heads, head_dim=self.width // self.num_heads,
                        mlp_dim=self.mlp_dim, adaptor_ratio=self.adaptor_ratio,
                        dropout_rate=self.dropout_rate, attention_impl=self.attention_impl,
                        dtype=dtype, param_dtype=param_dtype)
    self.decoder = transformer.layer_stack(
        RobertaLayer, num_layers=self.num_layers, scan_layers=self.scan_layers,
        remat_policy=self.remat_policy, cross_attention=True, **layer_kwargs)
    self.output_layer = RobertaLayer(cross_attention=False, **layer_kwargs)
    self.lm_head_dense = nn.Dense(
        self.width, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                 ("embed", "mlp")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))
    self.lm_head_norm = norms.LayerNorm(1e-5, True, dtype, param_dtype)
    self.lm_head_bias = self.param(
        "lm_head_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
        (self.vocab_size,), param_dtype)

  def expert_inputs(self, batch) -> tuple[dict, Any]:
    maps = {}
    for name in self.experts:
      if expert_key(name) not in batch:
        raise KeyError(f"batch has no {expert_key(name)!r} but config.model.experts includes "
                       f"{name!r} (batch keys: {sorted(batch)}).")
      maps[name] = batch[expert_key(name)]
    instances = None
    if "obj_detection" in self.experts:
      if INSTANCES_KEY not in batch:
        raise KeyError(f"batch has no {INSTANCES_KEY!r}, needed by the obj_detection expert.")
      instances = batch[INSTANCES_KEY]
    return maps, instances

  def encode_images(self, batch, deterministic: bool = True) -> jax.Array:
    """The adapted ViT's output [B, S, Dv] (S = h*w, + num_latents with experts)."""
    maps, instances = self.expert_inputs(batch)
    return self.vision(batch["images"][:, 0], maps, instances, deterministic)

  def vision_inputs(self, batch, deterministic: bool = True) -> jax.Array:
    """Tokens entering the ViT layers (RGB tokens, then the resampled expert tokens)."""
    maps, instances = self.expert_inputs(batch)
    return self.vision.embed_inputs(batch["images"][:, 0], maps, instances, deterministic)

  def encode(self, batch, deterministic: bool = True):
    """(encoded [B, S, Dv], encoder_mask [B, S]): every image and latent token is valid."""
    encoded = self.encode_images(batch, deterministic)
    return encoded, jnp.ones(encoded.shape[:2], bool)

  def decode(self, encoded, encoder_mask, tokens, token_mask=None, positions=None,
             key_mask=None, key_positions=None, deterministic: bool = True,
             decode: bool = False):
    """Logits [B, T, V] for decoder inputs `tokens` [B, T] attending to `encoded`.

    encoder_mask [B, S] (None: all valid); token_mask [B, T]: valid decoder inputs.
    positions [B, T]: rows of the position table after position_offset (default 0..T-1).
    decode=True: self-attention reads/writes the 'cache' collection (causal masking implied)
    with key_mask [B, S] its valid slots; `encoded` None reuses the cross-attention
    keys/values cached by an earlier decode call that passed it. key_positions: unused
    (learned absolute positions), accepted for the decoding interface (vlm_jax/decode.py).
    """
    del key_positions
    if positions is None:
      length = tokens.shape[1]
      if length + self.position_offset > self.max_text_length:
        raise ValueError(f"text length {length} + position_offset {self.position_offset} "
                         f"exceeds config.model.max_text_length={self.max_text_length}.")
      positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
    pos = jnp.take(self.pos_embedding(), positions + self.position_offset, axis=0)
    words = jnp.take(self.word_embedding, tokens, axis=0).astype(self.dtype)
    x = words + pos.astype(self.dtype) + self.token_type_embedding.astype(self.dtype)
    x = self.embed_dropout(self.embed_norm(x), deterministic=deterministic)
    self_mask = attention_lib.decoder_self_mask(tokens.shape[1], token_mask, key_mask, decode)
    cross_mask = (None if encoder_mask is None
                  else segment_mask.key_padding(encoder_mask, tokens.shape[1]))
    context = (encoded, self_mask, cross_mask)
    x = self.decoder(x, context, deterministic, decode)
    x = self.output_layer(x, context, deterministic, decode)
    x = self.lm_head_norm(nn.gelu(self.lm_head_dense(x), approximate=False))
    logits = jnp.einsum("BTD,VD->BTV", x, self.word_embedding.astype(self.dtype))
    logits = logits + self.lm_head_bias.astype(self.dtype)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

  def __call__(self, batch, deterministic: bool = True):
    encoded = self.encode_images(batch, deterministic)
    return self.decode(encoded, None, batch["tokens"], batch["loss_mask"],
                       deterministic=deterministic)


def batch_spec(data_config, batch_size: int) -> dict:
  """ShapeDtypeStructs of a batch (eval_shape, ahead-of-time compilation, dummy data)."""
  f32, i32 = jnp.float32, jnp.int32
  size, length, label = data_config.image_size, data_config.text_length, data_config.expert_size
  shapes = {
      "images": ((batch_size, 1, size, size, 3), f32),
      "tokens": ((batch_size, length), i32), "targets": ((batch_size, length), i32),
      "loss_mask": ((batch_size, length), f32), "loss_weight": ((batch_size,), f32),
  }
  for name in check_experts(data_config.experts):
    channels = DENSE_EXPERTS.get(name, data_config.label_dim)
    shapes[expert_key(name)] = ((batch_size, label, label, channels), f32)
    if name == "obj_detection":
      shapes[INSTANCES_KEY] = ((batch_size, label, label), i32)
  return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shapes.items()}
