"""SimVLM (arXiv 2108.10904): an encoder-decoder PrefixLM over [image ; text prefix].

    images -> ResNet conv stem (stride 16) -> patch tokens + learned 2-D position embedding
    prefix tokens -> shared token embedding + learned 1-D position embedding
    encoder: bidirectional self-attention over [image tokens ; prefix tokens]
    decoder: causal self-attention over the suffix + cross-attention to the encoder
    logits: tied to the token embedding (scaled by width**-0.5) or a separate projection

config.model (`build`): `lm` (`TextConfig`: the text encoder-decoder), `vision` (the conv
stem's `width` and `stage_blocks`), `dropout_rate`, `drop_path_rate`.
`lm.position='relative'` replaces the text position tables by T5's relative position bias
(one bucketed table per stack, over the encoder's whole [image ; prefix] sequence and the
decoder's suffix); with norm_type='rmsnorm', mlp_activation='geglu', use_bias=False and
tie_embeddings=False the text path is T5 v1.1, so a T5 checkpoint warm-starts it
(`vlm_jax.convert.t5`, `--config.init.lm`). The image keeps its learned 2-D grid.

Batch (fixed shapes; B examples, N images per example, Lp prefix and Ls suffix tokens):

    images        [B, N, H, W, 3] f32  pixels in [-1, 1] (N = 1 for SimVLM data)
    image_mask    [B, N] f32           0 marks a missing image (text-only documents): its
                                       tokens are masked out of every attention
    prefix_tokens [B, Lp] i32          text prefix, seen bidirectionally by the encoder
    prefix_mask   [B, Lp] f32          1 for real prefix tokens, 0 for padding
    tokens        [B, Ls] i32          decoder inputs: BOS, suffix[:-1]
    targets       [B, Ls] i32          suffix followed by EOS (used by the loss, not here)
    loss_mask     [B, Ls] f32          1 where the target is real; also marks the valid
                                       decoder inputs (padding inputs are masked as keys)
    loss_weight   [B] f32              per-example weight (used by the loss, not here)

Packed rows (config.data.packing; data/packing_encoder_decoder.py) hold several examples:
N = K image slots, Lp and Ls the row's prefix and decoder lengths, and per-token
`loss_weight` [B, Ls] plus segment ids (k-th example of the row, 0 = padding) and positions
inside each example: `segment_ids`/`positions` [B, Ls] (decoder), `prefix_segment_ids`/
`prefix_positions` [B, Lp], `image_segment_ids` [B, K]. The encoder sequence is then the K
slots' image tokens (each with its slot's example id) followed by the prefix stream;
encoder self-attention (bidirectional), decoder self-attention (causal) and cross-attention
are confined to equal ids; learned position tables are indexed by the per-example
positions, and T5's relative bias sees each token at its place in its own unpacked
[image ; prefix] or suffix sequence, so logits equal the unpacked examples' logits.

`__call__(batch, deterministic)` returns logits [B, Ls, V] aligned with `targets`. For
decoding: `encode(batch)` -> (encoded [B, S, D], encoder_mask [B, S]) and
`decode(encoded, encoder_mask, tokens, ..., decode=True)` with a KV cache (see
`vlm_jax.decode`). Padding (masked prefix tokens, masked images, padded suffix inputs) never
changes outputs at valid positions; a position with nothing to attend to gets a zero
attention output, never NaN.

The input embeddings pass through `self.perturb('prefix_embeddings' | 'suffix_embeddings')`
so tests and analyses can take gradients with respect to them (flax 'perturbations').
"""
import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.models import registry
from vlm_jax.nn import attention, conv_stem, decoder_lm, embeddings, norms, relative_position
from vlm_jax.nn import segment_mask, transformer
from vlm_jax.nn import flops as F

POSITIONS = ("learned", "relative")
# Packed rows' keys (data/packing_encoder_decoder.py; models do not import data).
SEGMENT_IDS, TOKEN_POSITIONS = "segment_ids", "positions"
PREFIX_SEGMENT_IDS, PREFIX_POSITIONS = "prefix_segment_ids", "prefix_positions"
IMAGE_SEGMENT_IDS = "image_segment_ids"


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The text encoder-decoder (config.model.lm)."""
  vocab_size: int
  width: int
  num_heads: int
  mlp_dim: int
  encoder_layers: int
  decoder_layers: int
  head_dim: int | None = None  # None: width // num_heads
  mlp_activation: str = "gelu"
  norm_type: str = "layernorm"
  max_text_length: int = 64  # size of the prefix and suffix position tables
  position: str = "learned"  # learned | relative (T5 bucketed bias)
  relative_buckets: int = 32
  relative_max_distance: int = 128
  use_bias: bool = True  # in attention and MLP projections
  tie_embeddings: bool = True


class ImageEmbedder(nn.Module):
  """images [B, N, H, W, C] -> tokens [B, N*h*w, D] with a learned [h, w, D] position grid."""
  width: int
  stem: Any  # ConvStem fields (width, stage_blocks)
  drop_path_rate: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, images, deterministic: bool = True):
    batch, num_images = images.shape[:2]
    x = conv_stem.ConvStem(self.width, **self.stem, drop_path_rate=self.drop_path_rate,
                           dtype=self.dtype, param_dtype=self.param_dtype, name="stem")(
                               images.reshape((-1,) + images.shape[2:]), deterministic)
    grid = x.shape[1:3]
    x = x + embeddings.PositionEmbedding(grid, self.width, param_dtype=self.param_dtype,
                                         name="pos_embedding")().astype(self.dtype)
    x = x.reshape(batch, num_images * grid[0] * grid[1], self.width)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class SimVLM(nn.Module):
  # config.init.lm: a T5 v1.1 checkpoint fills the text encoder-decoder (see convert/t5.py).
  PRETRAINED_PARTS = {"lm": {"path": "", "exclude": (r"image_embedder/.*",), "arch": "t5"}}

  lm: TextConfig
  vision: Any = flax.core.FrozenDict()  # ConvStem fields: width, stage_blocks
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0  # conv stage and encoder only, as in the paper
  scan_layers: bool = True
  remat_policy: str = "none"
  attention_impl: str = "xla"  # xla | splash | cudnn (nn/fused_attention.py)
  dtype: str = "float32"
  param_dtype: str = "float32"

  def setup(self):
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    lm = self.lm
    layer_kwargs = dict(
        num_heads=lm.num_heads, head_dim=lm.head_dim or lm.width // lm.num_heads,
        mlp_dim=lm.mlp_dim, mlp_activation=lm.mlp_activation, norm_type=lm.norm_type,
        use_bias=lm.use_bias, dropout_rate=self.dropout_rate,
        attention_impl=self.attention_impl, dtype=dtype, param_dtype=param_dtype)
    self.image_embedder = ImageEmbedder(lm.width, self.vision, self.drop_path_rate, dtype,
                                        param_dtype)
    self.token_embedder = embeddings.Embed(lm.vocab_size, lm.width, dtype, param_dtype)
    if lm.position not in POSITIONS:
      raise ValueError(f"position={lm.position!r}: expected one of {POSITIONS}.")
    if lm.position == "learned":
      self.prefix_pos_embedding = embeddings.PositionEmbedding(
          (lm.max_text_length,), lm.width, param_dtype=param_dtype)
      self.suffix_pos_embedding = embeddings.PositionEmbedding(
          (lm.max_text_length,), lm.width, param_dtype=param_dtype)
    else:
      relative = dict(num_heads=lm.num_heads, num_buckets=lm.relative_buckets,
                      max_distance=lm.relative_max_distance, param_dtype=param_dtype)
      self.encoder_relative_bias = relative_position.RelativePositionBias(
          bidirectional=True, **relative)
      self.decoder_relative_bias = relative_position.RelativePositionBias(
          bidirectional=False, **relative)
    self.embed_dropout = nn.Dropout(self.dropout_rate)
    self.encoder = transformer.layer_stack(
        transformer.Layer, num_layers=lm.encoder_layers, scan_layers=self.scan_layers,
        remat_policy=self.remat_policy, drop_path_rate=self.drop_path_rate, **layer_kwargs)
    self.encoder_norm = norms.make_norm(lm.norm_type, dtype=dtype, param_dtype=param_dtype)
    self.decoder = transformer.layer_stack(
        transformer.CrossAttentionLayer, num_layers=lm.decoder_layers,
        scan_layers=self.scan_layers, remat_policy=self.remat_policy, **layer_kwargs)
    self.decoder_norm = norms.make_norm(lm.norm_type, dtype=dtype, param_dtype=param_dtype)
    if not lm.tie_embeddings:
      self.logits_projection = nn.Dense(
          lm.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
          kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                   ("embed", "vocab")))

  def encode(self, batch, deterministic: bool = True):
    """Returns (encoded [B, S, D], encoder_mask [B, S] bool), S = N*h*w + Lp. Packed rows
    (`segment_ids` in the batch): attention within each example's segment
    (`encoder_segment_ids`), per-example prefix positions."""
    images = batch["images"].astype(jnp.dtype(self.dtype))
    image_tokens = self.image_embedder(images, deterministic)
    tokens_per_image = image_tokens.shape[1] // images.shape[1]
    image_valid = jnp.repeat(batch["image_mask"] > 0, tokens_per_image, axis=1)
    prefix_tokens = batch["prefix_tokens"]
    packed = SEGMENT_IDS in batch
    prefix = self.token_embedder(prefix_tokens)
    if self.lm.position == "learned":
      if packed:  # each example's prefix restarts the table
        table = jnp.take(self.prefix_pos_embedding(), batch[PREFIX_POSITIONS], axis=0)
      else:
        self._check_length(prefix_tokens.shape[1], "prefix")
        table = self.prefix_pos_embedding()[:prefix_tokens.shape[1]]
      prefix = prefix + table.astype(prefix.dtype)
    prefix = self.perturb("prefix_embeddings", prefix)
    x = jnp.concatenate([image_tokens, prefix], axis=1)
    valid = jnp.concatenate([image_valid, batch["prefix_mask"] > 0], axis=1)
    x = self.embed_dropout(x, deterministic=deterministic)
    bias = None
    if self.lm.position == "relative":
      order = (encoder_positions(batch, tokens_per_image) if packed
               else jnp.arange(x.shape[1])[None])
      bias = self.encoder_relative_bias(order, order)
    if packed:
      ids = encoder_segment_ids(batch, tokens_per_image)
      mask = segment_mask.SegmentMask(ids, ids)
    else:
      mask = segment_mask.key_padding(valid, x.shape[1])
    x = self.encoder(x, transformer.LayerContext(mask=mask, bias=bias), deterministic)
    return self.encoder_norm(x), valid

  def decode(self, encoded, encoder_mask, tokens, token_mask=None, positions=None,
             key_mask=None, key_positions=None, deterministic: bool = True,
             decode: bool = False, segment_ids=None, encoder_segment_ids=None):
    """Logits [B, T, V] for decoder inputs `tokens` [B, T].

    token_mask [B, T]: valid decoder inputs (padding is masked as keys). positions [B, T]:
    indices into the suffix position table, or the query positions of the relative bias
    (default 0..T-1; pass the step when decoding).
    decode=True: self-attention reads/writes the 'cache' collection (causal masking implied);
    key_mask [B, S] marks its valid slots (prompt padding off) and key_positions [B, S] their
    positions (relative bias; default the slot indices). `encoded` None reuses the
    cross-attention keys/values cached by an earlier decode call that passed it.
    Packed rows (training): segment_ids [B, T] and encoder_segment_ids [B, S] (0 = padding)
    confine self-attention (causal) and cross-attention to each example's segment; positions
    are then the per-example positions.
    """
    if positions is None:
      if self.lm.position == "learned":
        self._check_length(tokens.shape[1], "suffix")
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = self.token_embedder(tokens)
    if self.lm.position == "learned":
      x = x + jnp.take(self.suffix_pos_embedding(), positions, axis=0).astype(x.dtype)
    x = self.perturb("suffix_embeddings", x)
    x = self.embed_dropout(x, deterministic=deterministic)
    if segment_ids is not None:
      self_mask = segment_mask.packed(segment_ids)
      cross_mask = segment_mask.SegmentMask(segment_ids, encoder_segment_ids)
    else:
      self_mask = attention.decoder_self_mask(tokens.shape[1], token_mask, key_mask, decode)
      cross_mask = segment_mask.key_padding(encoder_mask, tokens.shape[1])
    bias = None
    if self.lm.position == "relative":
      keys = key_positions if decode else positions  # None: cache slots
      bias = self.decoder_relative_bias(positions, keys)
    context = transformer.LayerContext(mask=self_mask, bias=bias, encoded=encoded,
                                       cross_mask=cross_mask)
    x = self.decoder(x, context, deterministic, decode)
    x = self.decoder_norm(x)
    if self.lm.tie_embeddings:
      return self.token_embedder.attend(x) * self.lm.width ** -0.5
    return nn.with_logical_constraint(self.logits_projection(x), ("batch", "length", "vocab"))

  def _check_length(self, length, what):
    if length > self.lm.max_text_length:
      raise ValueError(f"{what} length {length} exceeds config.model.lm.max_text_length="
                       f"{self.lm.max_text_length} (the position table size).")

  def __call__(self, batch, deterministic: bool = True):
    encoded, encoder_mask = self.encode(batch, deterministic)
    if SEGMENT_IDS not in batch:
      return self.decode(encoded, encoder_mask, batch["tokens"], batch["loss_mask"],
                         deterministic=deterministic)
    image_tokens = encoded.shape[1] - batch["prefix_tokens"].shape[1]
    tokens_per_image = image_tokens // batch["images"].shape[1]
    return self.decode(encoded, encoder_mask, batch["tokens"], batch["loss_mask"],
                       positions=batch[TOKEN_POSITIONS], deterministic=deterministic,
                       segment_ids=batch[SEGMENT_IDS],
                       encoder_segment_ids=encoder_segment_ids(batch, tokens_per_image))


def encoder_segment_ids(batch, tokens_per_image: int) -> jax.Array:
  """[B, K*h*w + P] segment ids of a packed row's encoder sequence: each image slot's tokens
  carry its example's id (0: an unused slot), then the prefix's
  (data/packing_encoder_decoder.py)."""
  slots = batch[IMAGE_SEGMENT_IDS] * (batch["image_mask"] > 0)
  return jnp.concatenate([jnp.repeat(slots, tokens_per_image, axis=1),
                          batch[PREFIX_SEGMENT_IDS]], axis=1).astype(jnp.int32)


def encoder_positions(batch, tokens_per_image: int) -> jax.Array:
  """[B, K*h*w + P] positions of a packed row's encoder tokens in their unpacked example's
  [image ; prefix] sequence (T5's relative bias): image token j at j, prefix token p at
  h*w + p (an unpacked example always has its one image slot, masked or not)."""
  slots = batch["images"].shape[1]
  image = jnp.tile(jnp.arange(tokens_per_image), slots)
  image = jnp.broadcast_to(image, (batch[PREFIX_POSITIONS].shape[0], image.shape[0]))
  return jnp.concatenate([image, tokens_per_image + batch[PREFIX_POSITIONS]], axis=1)


def build(model_config) -> SimVLM:
  c = model_config
  registry.check_keys(c, ("lm", "vision", "dropout_rate", "drop_path_rate"))
  return SimVLM(lm=TextConfig(**registry.sub_config(TextConfig, c, "lm")),
                vision=registry.sub_config(conv_stem.ConvStem, c, "vision",
                                           fixed=("out_features", "drop_path_rate")),
                dropout_rate=c.dropout_rate, drop_path_rate=c.drop_path_rate,
                scan_layers=c.scan_layers, remat_policy=c.remat_policy,
                attention_impl=c.attention_impl, dtype=c.dtype, param_dtype=c.param_dtype)


def batch_spec(data_config, batch_size: int) -> dict:
  """ShapeDtypeStructs of a batch (for eval_shape, ahead-of-time compilation, dummy data);
  with `data_config.packing` packed rows (data/packing_encoder_decoder.py)."""
  f32, i32 = jnp.float32, jnp.int32
  size, prefix, suffix = data_config.image_size, data_config.prefix_length, data_config.suffix_length
  images, packed = 1, data_config.get("packing", False)
  if packed:
    images = data_config.packed_images
    prefix, suffix = data_config.packed_prefix_length, data_config.packed_suffix_length
  shapes = {
      "images": ((batch_size, images, size, size, 3), f32),
      "image_mask": ((batch_size, images), f32),
      "prefix_tokens": ((batch_size, prefix), i32), "prefix_mask": ((batch_size, prefix), f32),
      "tokens": ((batch_size, suffix), i32), "targets": ((batch_size, suffix), i32),
      "loss_mask": ((batch_size, suffix), f32),
      "loss_weight": ((batch_size, suffix) if packed else (batch_size,), f32),
  }
  if packed:
    shapes.update({k: ((batch_size, n), i32) for k, n in (
        (SEGMENT_IDS, suffix), (TOKEN_POSITIONS, suffix), (PREFIX_SEGMENT_IDS, prefix),
        (PREFIX_POSITIONS, prefix), (IMAGE_SEGMENT_IDS, images))})
  return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shapes.items()}


def flops_parts(config, causal_half=True) -> dict:
  """Per row: one example, or with data.packing several sharing the row's prefix and decoder
  slots and its `packed_images` image slots, each of which the stem and the encoder process
  (used or not)."""
  lm, data = config.model.lm, config.data
  width, heads = lm.width, lm.num_heads
  head_dim = lm.get("head_dim") or width // heads
  act = lm.get("mlp_activation", "gelu")
  stem, grid = F.conv_stem(data.image_size, config.model.vision.width,
                           config.model.vision.stage_blocks, width)
  images, prefix, dec_len = 1, data.prefix_length, data.suffix_length
  if data.get("packing", False):
    images, prefix, dec_len = (data.packed_images, data.packed_prefix_length,
                               data.packed_suffix_length)
  enc_len = images * grid * grid + prefix
  enc_layer = (F.attention(enc_len, enc_len, width, heads, head_dim)
               + F.mlp(enc_len, width, lm.mlp_dim, act))
  dec_layer = (F.attention(dec_len, dec_len, width, heads, head_dim, causal_half=causal_half)
               + F.attention(dec_len, enc_len, width, heads, head_dim)
               + F.mlp(dec_len, width, lm.mlp_dim, act))
  return {
      "image_embedder": images * stem,
      "encoder": lm.encoder_layers * enc_layer,
      "decoder": lm.decoder_layers * dec_layer,
      "logits": F.dense(dec_len, width, lm.vocab_size),
  }


def attention_masks(config, batch, example: int = 0) -> dict:
  """SimVLM's encoder self, decoder self and decoder cross masks, and the same model seen as
  one decoder-only PrefixLM over [image ; prefix ; suffix] (`decoder_lm.prefix_lm_mask`),
  for the model notebook."""
  _, grid = F.conv_stem(config.data.image_size, config.model.vision.width,
                        config.model.vision.stage_blocks, config.model.lm.width)
  prefix_valid = jnp.asarray(batch["prefix_mask"][example:example + 1] > 0)
  suffix_valid = jnp.asarray(batch["loss_mask"][example:example + 1] > 0)
  encoder_valid = jnp.concatenate([jnp.ones((1, grid * grid), bool), prefix_valid], axis=1)
  causal = jnp.concatenate([jnp.zeros_like(encoder_valid), jnp.ones_like(suffix_valid)], axis=1)
  all_valid = jnp.concatenate([encoder_valid, suffix_valid], axis=1)
  masks = {
      "encoder self-attention": attention.padding_mask(None, encoder_valid),
      "decoder self-attention": attention.causal_mask(suffix_valid.shape[1])
                                & attention.padding_mask(None, suffix_valid),
      "decoder cross-attention": attention.padding_mask(None, encoder_valid),
      "as one PrefixLM": decoder_lm.prefix_lm_mask(causal)
                         & attention.padding_mask(None, all_valid),
  }
  # Padding masks hold one row for every query: draw them at their [queries, keys] size.
  queries = {"encoder self-attention": encoder_valid.shape[1],
             "decoder self-attention": suffix_valid.shape[1],
             "decoder cross-attention": suffix_valid.shape[1],
             "as one PrefixLM": all_valid.shape[1]}
  return {k: np.broadcast_to(np.asarray(m[0, 0]), (queries[k], m.shape[-1]))
          for k, m in masks.items()}
