"""SimVLM (arXiv 2108.10904): an encoder-decoder PrefixLM over [image ; text prefix].

    images -> ResNet conv stem (stride 16) -> patch tokens + learned 2-D position embedding
    prefix tokens -> shared token embedding + learned 1-D position embedding
    encoder: bidirectional self-attention over [image tokens ; prefix tokens]
    decoder: causal self-attention over the suffix + cross-attention to the encoder
    logits: tied to the token embedding (scaled by width**-0.5) or a separate projection

`position='relative'` replaces the text position tables by T5's relative position bias (one
bucketed table per stack, over the encoder's whole [image ; prefix] sequence and the
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

`__call__(batch, deterministic)` returns logits [B, Ls, V] aligned with `targets`. For
decoding: `encode(batch)` -> (encoded [B, S, D], encoder_mask [B, S]) and
`decode(encoded, encoder_mask, tokens, ..., decode=True)` with a KV cache (see
`vlm_jax.decode`). Padding (masked prefix tokens, masked images, padded suffix inputs) never
changes outputs at valid positions; a position with nothing to attend to gets a zero
attention output, never NaN.

The input embeddings pass through `self.perturb('prefix_embeddings' | 'suffix_embeddings')`
so tests and analyses can take gradients with respect to them (flax 'perturbations').
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.nn import attention, conv_stem, embeddings, norms, relative_position, segment_mask
from vlm_jax.nn import transformer

POSITIONS = ("learned", "relative")


class ImageEmbedder(nn.Module):
  """images [B, N, H, W, C] -> tokens [B, N*h*w, D] with a learned [h, w, D] position grid."""
  width: int
  stem_width: int
  stem_blocks: tuple[int, ...]
  drop_path_rate: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, images, deterministic: bool = True):
    batch, num_images = images.shape[:2]
    x = conv_stem.ConvStem(self.width, self.stem_width, tuple(self.stem_blocks),
                           self.drop_path_rate, self.dtype, self.param_dtype, name="stem")(
                               images.reshape((-1,) + images.shape[2:]), deterministic)
    grid = x.shape[1:3]
    x = x + embeddings.PositionEmbedding(grid, self.width, param_dtype=self.param_dtype,
                                         name="pos_embedding")().astype(self.dtype)
    x = x.reshape(batch, num_images * grid[0] * grid[1], self.width)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class SimVLM(nn.Module):
  # config.init.lm: a T5 v1.1 checkpoint fills the text encoder-decoder (see convert/t5.py).
  PRETRAINED_PARTS = {"lm": {"path": "", "exclude": (r"image_embedder/.*",), "arch": "t5"}}

  vocab_size: int
  width: int
  num_heads: int
  mlp_dim: int
  encoder_layers: int
  decoder_layers: int
  head_dim: int | None = None  # None: width // num_heads
  mlp_activation: str = "gelu"
  norm_type: str = "layernorm"
  stem_width: int = 64
  stem_blocks: tuple[int, ...] = (3, 4, 6)
  max_text_length: int = 64  # size of the prefix and suffix position tables
  position: str = "learned"  # learned | relative (T5 bucketed bias)
  relative_buckets: int = 32
  relative_max_distance: int = 128
  use_bias: bool = True  # in attention and MLP projections
  tie_embeddings: bool = True
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0  # conv stage and encoder only, as in the paper
  scan_layers: bool = True
  remat_policy: str = "none"
  attention_impl: str = "xla"  # xla | splash | cudnn (nn/fused_attention.py)
  dtype: str = "float32"
  param_dtype: str = "float32"

  def setup(self):
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    layer_kwargs = dict(
        num_heads=self.num_heads, head_dim=self.head_dim or self.width // self.num_heads,
        mlp_dim=self.mlp_dim, mlp_activation=self.mlp_activation, norm_type=self.norm_type,
        use_bias=self.use_bias, dropout_rate=self.dropout_rate,
        attention_impl=self.attention_impl, dtype=dtype, param_dtype=param_dtype)
    self.image_embedder = ImageEmbedder(self.width, self.stem_width, tuple(self.stem_blocks),
                                        self.drop_path_rate, dtype, param_dtype)
    self.token_embedder = embeddings.Embed(self.vocab_size, self.width, dtype, param_dtype)
    if self.position not in POSITIONS:
      raise ValueError(f"position={self.position!r}: expected one of {POSITIONS}.")
    if self.position == "learned":
      self.prefix_pos_embedding = embeddings.PositionEmbedding(
          (self.max_text_length,), self.width, param_dtype=param_dtype)
      self.suffix_pos_embedding = embeddings.PositionEmbedding(
          (self.max_text_length,), self.width, param_dtype=param_dtype)
    else:
      relative = dict(num_heads=self.num_heads, num_buckets=self.relative_buckets,
                      max_distance=self.relative_max_distance, param_dtype=param_dtype)
      self.encoder_relative_bias = relative_position.RelativePositionBias(
          bidirectional=True, **relative)
      self.decoder_relative_bias = relative_position.RelativePositionBias(
          bidirectional=False, **relative)
    self.embed_dropout = nn.Dropout(self.dropout_rate)
    self.encoder = transformer.layer_stack(
        transformer.EncoderLayer, num_layers=self.encoder_layers, scan_layers=self.scan_layers,
        remat_policy=self.remat_policy, drop_path_rate=self.drop_path_rate, **layer_kwargs)
    self.encoder_norm = norms.make_norm(self.norm_type, dtype, param_dtype)
    self.decoder = transformer.layer_stack(
        transformer.DecoderLayer, num_layers=self.decoder_layers, scan_layers=self.scan_layers,
        remat_policy=self.remat_policy, **layer_kwargs)
    self.decoder_norm = norms.make_norm(self.norm_type, dtype, param_dtype)
    if not self.tie_embeddings:
      self.logits_projection = nn.Dense(
          self.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
          kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                   ("embed", "vocab")))

  def encode(self, batch, deterministic: bool = True):
    """Returns (encoded [B, S, D], encoder_mask [B, S] bool), S = N*h*w + Lp."""
    images = batch["images"].astype(jnp.dtype(self.dtype))
    image_tokens = self.image_embedder(images, deterministic)
    tokens_per_image = image_tokens.shape[1] // images.shape[1]
    image_valid = jnp.repeat(batch["image_mask"] > 0, tokens_per_image, axis=1)
    prefix_tokens = batch["prefix_tokens"]
    prefix = self.token_embedder(prefix_tokens)
    if self.position == "learned":
      self._check_length(prefix_tokens.shape[1], "prefix")
      prefix = prefix + self.prefix_pos_embedding()[:prefix_tokens.shape[1]].astype(prefix.dtype)
    prefix = self.perturb("prefix_embeddings", prefix)
    x = jnp.concatenate([image_tokens, prefix], axis=1)
    valid = jnp.concatenate([image_valid, batch["prefix_mask"] > 0], axis=1)
    x = self.embed_dropout(x, deterministic=deterministic)
    context = (segment_mask.key_padding(valid, x.shape[1]),)
    if self.position == "relative":
      order = jnp.arange(x.shape[1])
      context += (self.encoder_relative_bias(order[None], order),)
    x = self.encoder(x, context, deterministic)
    return self.encoder_norm(x), valid

  def decode(self, encoded, encoder_mask, tokens, token_mask=None, positions=None,
             key_mask=None, key_positions=None, deterministic: bool = True,
             decode: bool = False):
    """Logits [B, T, V] for decoder inputs `tokens` [B, T].

    token_mask [B, T]: valid decoder inputs (padding is masked as keys). positions [B, T]:
    indices into the suffix position table, or the query positions of the relative bias
    (default 0..T-1; pass the step when decoding).
    decode=True: self-attention reads/writes the 'cache' collection (causal masking implied);
    key_mask [B, S] marks its valid slots (prompt padding off) and key_positions [B, S] their
    positions (relative bias; default the slot indices). `encoded` None reuses the
    cross-attention keys/values cached by an earlier decode call that passed it.
    """
    if positions is None:
      if self.position == "learned":
        self._check_length(tokens.shape[1], "suffix")
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = self.token_embedder(tokens)
    if self.position == "learned":
      x = x + jnp.take(self.suffix_pos_embedding(), positions, axis=0).astype(x.dtype)
    x = self.perturb("suffix_embeddings", x)
    x = self.embed_dropout(x, deterministic=deterministic)
    self_mask = attention.decoder_self_mask(tokens.shape[1], token_mask, key_mask, decode)
    cross_mask = segment_mask.key_padding(encoder_mask, tokens.shape[1])
    context = (encoded, self_mask, cross_mask)
    if self.position == "relative":
      keys = key_positions if decode else jnp.arange(tokens.shape[1])  # None: cache slots
      context += (self.decoder_relative_bias(positions, keys),)
    x = self.decoder(x, context, deterministic, decode)
    x = self.decoder_norm(x)
    if self.tie_embeddings:
      return self.token_embedder.attend(x) * self.width ** -0.5
    return nn.with_logical_constraint(self.logits_projection(x), ("batch", "length", "vocab"))

  def _check_length(self, length, what):
    if length > self.max_text_length:
      raise ValueError(f"{what} length {length} exceeds config.model.max_text_length="
                       f"{self.max_text_length} (the position table size).")

  def __call__(self, batch, deterministic: bool = True):
    encoded, encoder_mask = self.encode(batch, deterministic)
    return self.decode(encoded, encoder_mask, batch["tokens"], batch["loss_mask"],
                       deterministic=deterministic)


def batch_spec(data_config, batch_size: int) -> dict:
  """ShapeDtypeStructs of a batch (for eval_shape, ahead-of-time compilation, dummy data)."""
  f32, i32 = jnp.float32, jnp.int32
  size, prefix, suffix = data_config.image_size, data_config.prefix_length, data_config.suffix_length
  shapes = {
      "images": ((batch_size, 1, size, size, 3), f32), "image_mask": ((batch_size, 1), f32),
      "prefix_tokens": ((batch_size, prefix), i32), "prefix_mask": ((batch_size, prefix), f32),
      "tokens": ((batch_size, suffix), i32), "targets": ((batch_size, suffix), i32),
      "loss_mask": ((batch_size, suffix), f32), "loss_weight": ((batch_size,), f32),
  }
  return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shapes.items()}
