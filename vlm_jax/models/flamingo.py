"""Flamingo (arXiv 2204.14198) / OpenFlamingo: frozen ViT -> Perceiver Resampler -> GATED
XATTN-DENSE blocks inside a frozen decoder-only LM.

    images [B, N, H, W, 3] (or video [B, N, F, H, W, 3]: F frames per media item)
      -> ViT per image / frame (frozen, stop-gradient; class token dropped, final LN)
      -> [B*N, F, P, Dv] -> Perceiver Resampler (time embeddings per frame when
         `max_frames` > 0) -> [B, N, L, Dv] -> flattened visual tokens [B, N*L, Dv]
    tokens -> LM token embeddings; `<image>` and `<|endofchunk|>` (`new_token_ids`) take
      rows of a small trainable table instead of the frozen LM's rows
    LM (`vlm_jax.nn.decoder_lm.DecoderLM`, frozen), scanned in groups of `xattn_group`
      layers; a gated block (`vlm_jax.nn.gated_xattn`) runs before each sublayer listed in
      `xattn_sublayers`. OpenFlamingo's "before layer i when (i+1) % k == 0" is group k,
      sublayers (k-1,): `openflamingo_placement(k)`.
    -> logits [B, T, V] aligned with `targets`

Masking: token t cross-attends to the visual tokens of the most recent present media item
whose `<image>` token is at or before t (`only_attend_immediate=False`: all of them); tokens
before any item get zero cross-attention output; absent items are never attended.

Batch (fixed shapes; written by `vlm_jax.data.flamingo`):

    images          [B, N, H, W, 3] f32   pixels in [-1, 1]; video: [B, N, F, H, W, 3]
    image_mask      [B, N] f32            1 for a real media item, 0 for a padded slot
    image_positions [B, N] i32            index in `tokens` of item n's `<image>` token
    tokens          [B, T] i32            BOS, text, <image>, <|endofchunk|>, EOS, PAD
    targets         [B, T] i32            next-token targets (used by the loss)
    loss_mask       [B, T] f32            1 on text inside a chunk (after an <image>, up to
                                          and including its <|endofchunk|>)
    token_mask      [B, T] f32            1 for real input tokens (padding masked as keys)
    loss_weight     [B] f32               the dataset's loss weight (M3W 1.0, pairs 0.2)

Trainable: the resampler, the gated blocks and the 2-row `new_token_embedding`;
`frozen_patterns()` freezes `vision/.*` and every other `lm/...` param. OpenFlamingo trains
the whole input embedding; we train only the rows of the tokens Flamingo adds, which is
what learning them needs (the frozen LM's other rows stay its own), and keeps a tied LM
head frozen.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.nn import decoder_lm, embeddings, gated_xattn, resampler, vit


def openflamingo_placement(interval: int) -> tuple[int, tuple[int, ...]]:
  """(xattn_group, xattn_sublayers) for a block before layer i when (i+1) % interval == 0."""
  return interval, (interval - 1,)


class FlamingoLayerGroup(decoder_lm.DecoderLayerGroup):
  """`group_size` LM sublayers with a gated cross-attention block before those listed."""
  xattn_sublayers: tuple[int, ...] = (0,)
  xattn_heads: int = 8
  xattn_head_dim: int = 64
  xattn_mlp_ratio: int = 4
  xattn_activation: str = "gelu"

  def before_sublayer(self, index, x, context, deterministic, decode):
    del deterministic
    if index not in self.xattn_sublayers:
      return x
    return gated_xattn.GatedCrossAttentionDense(
        self.xattn_heads, self.xattn_head_dim, self.xattn_mlp_ratio, self.xattn_activation,
        dtype=self.dtype, param_dtype=self.param_dtype, name=f"xattn_{index}")(
            x, context.extra["media"], context.extra["media_mask"], decode=decode)


class Flamingo(nn.Module):
  # `--config.init.lm` / `--config.init.vision` (vlm_jax/convert): the gated blocks inside the
  # LM's layer groups are new and keep their initialisation.
  PRETRAINED_PARTS = {"lm": {"path": "lm", "new": (r"layers/.*xattn_\d+/.*",)},
                      "vision": {"path": "vision"}}

  vocab_size: int
  # language model (frozen)
  width: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  head_dim: int | None = None
  num_kv_heads: int | None = None
  mlp_activation: str = "swiglu"
  norm_type: str = "rmsnorm"
  norm_epsilon: float = 1e-5
  use_bias: bool = False
  position: str = "rotary"
  max_length: int = 4096
  parallel_residual: bool = False
  tie_embeddings: bool = False
  new_token_ids: tuple[int, ...] = (4, 5)  # <image>, <|endofchunk|> (data/vocab.py)
  # vision encoder (frozen): CLIP ViT layout (class token, ln_pre, quick-GELU, ln_post)
  vision_width: int = 1024
  vision_layers: int = 24
  vision_heads: int = 16
  vision_mlp_dim: int = 4096
  patch_size: int = 14
  vision_activation: str = "quick_gelu"
  # Perceiver Resampler (trainable), in the vision width
  resampler_layers: int = 6
  num_latents: int = 64
  resampler_heads: int = 8
  resampler_head_dim: int = 64
  resampler_mlp_ratio: int = 4
  resampler_activation: str = "gelu"
  max_frames: int = 0  # > 0: learned time embeddings for video of up to this many frames
  # gated cross-attention (trainable)
  xattn_group: int = 1
  xattn_sublayers: tuple[int, ...] = (0,)
  xattn_heads: int = 8
  xattn_head_dim: int = 64
  xattn_mlp_ratio: int = 4
  xattn_activation: str = "gelu"
  only_attend_immediate: bool = True
  scan_layers: bool = True
  remat_policy: str = "none"
  dtype: str = "float32"
  param_dtype: str = "float32"

  def setup(self):
    bad = [i for i in self.xattn_sublayers if not 0 <= i < self.xattn_group]
    if bad or not self.xattn_sublayers:
      raise ValueError(f"xattn_sublayers={tuple(self.xattn_sublayers)}: need indices in "
                       f"[0, xattn_group={self.xattn_group}).")
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    self.vision = vit.ViT(
        patch_size=self.patch_size, width=self.vision_width, depth=self.vision_layers,
        num_heads=self.vision_heads, mlp_dim=self.vision_mlp_dim,
        mlp_activation=self.vision_activation, class_token=True, pre_norm=True,
        patch_bias=False, scan_layers=self.scan_layers, remat_policy=self.remat_policy,
        dtype=dtype, param_dtype=param_dtype)
    self.resampler = resampler.PerceiverResampler(
        num_latents=self.num_latents, num_layers=self.resampler_layers,
        num_heads=self.resampler_heads, head_dim=self.resampler_head_dim,
        mlp_ratio=self.resampler_mlp_ratio, mlp_activation=self.resampler_activation,
        num_frames=self.max_frames, dtype=dtype, param_dtype=param_dtype)
    self.new_token_embedding = self.param(
        "new_token_embedding",
        nn.with_logical_partitioning(embeddings.lm_embedding_init(self.width), (None, "embed")),
        (len(self.new_token_ids), self.width), param_dtype)
    self.lm = decoder_lm.DecoderLM(
        vocab_size=self.vocab_size, width=self.width, num_layers=self.num_layers,
        num_heads=self.num_heads, mlp_dim=self.mlp_dim, head_dim=self.head_dim,
        num_kv_heads=self.num_kv_heads, mlp_activation=self.mlp_activation,
        norm_type=self.norm_type, norm_epsilon=self.norm_epsilon, use_bias=self.use_bias,
        position=self.position, max_length=self.max_length,
        parallel_residual=self.parallel_residual, tie_embeddings=self.tie_embeddings,
        layer_cls=FlamingoLayerGroup, layers_per_unit=self.xattn_group,
        layer_kwargs={"xattn_sublayers": tuple(self.xattn_sublayers),
                      "xattn_heads": self.xattn_heads, "xattn_head_dim": self.xattn_head_dim,
                      "xattn_mlp_ratio": self.xattn_mlp_ratio,
                      "xattn_activation": self.xattn_activation},
        scan_layers=self.scan_layers, remat_policy=self.remat_policy, dtype=self.dtype,
        param_dtype=self.param_dtype)

  def encode_media(self, images: jax.Array) -> jax.Array:
    """images [B, N, H, W, C] or [B, N, F, H, W, C] -> visual tokens [B, N, L, Dv]."""
    if images.ndim not in (5, 6):
      raise ValueError(f"images of shape {images.shape}: expected [B, N, H, W, C] or "
                       "[B, N, F, H, W, C] (video frames).")
    batch, num_media = images.shape[:2]
    frames = images.shape[2] if images.ndim == 6 else 1
    x = self.vision(images.reshape((-1,) + images.shape[-3:]).astype(jnp.dtype(self.dtype)))
    x = jax.lax.stop_gradient(x[:, 1:])  # frozen encoder, not differentiated; class token out
    x = x.reshape((batch * num_media, frames) + x.shape[1:])
    latents = self.resampler(x)
    return latents.reshape((batch, num_media) + latents.shape[1:])

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """LM embeddings [B, T, D], the new special tokens' rows from the trainable table."""
    x = self.lm.embed(tokens)
    for row, token_id in enumerate(self.new_token_ids):
      x = jnp.where((tokens == token_id)[..., None],
                    self.new_token_embedding[row].astype(x.dtype), x)
    return x

  def embed_inputs(self, batch) -> tuple[jax.Array, jax.Array, dict]:
    """(token embeddings [B, T, D], token_mask [B, T], the layers' `extra`: flattened visual
    tokens [B, N*L, Dv] and their mask [B, 1, T, N*L])."""
    tokens = batch["tokens"]
    media = self.encode_media(batch["images"])
    num_media, tokens_per_media = media.shape[1:3]
    mask = gated_xattn.media_attention_mask(
        batch["image_positions"], batch["image_mask"], tokens.shape[1], tokens_per_media,
        self.only_attend_immediate)
    extra = {"media": media.reshape(media.shape[0], num_media * tokens_per_media, -1),
             "media_mask": mask}
    return self.embed_tokens(tokens), batch["token_mask"], extra

  def embed_generated(self, tokens: jax.Array) -> jax.Array:
    """Embeddings of generated tokens [B, 1] (decoding, `vlm_jax.decode`)."""
    return self.embed_tokens(tokens)

  def generation_extra(self, extra: dict, last: jax.Array) -> dict:
    """`extra` for one generated token: it sees the media the prompt's last token [B] sees
    (a generated `<image>` brings no new media), through the keys/values the prompt cached
    (media None)."""
    mask = jnp.take_along_axis(extra["media_mask"], last[:, None, None, None], axis=2)
    return dict(extra, media_mask=mask, media=None)

  def __call__(self, batch, deterministic: bool = True):
    x, token_mask, extra = self.embed_inputs(batch)
    hidden = self.lm.trunk(x, token_mask=token_mask, extra=extra, deterministic=deterministic)
    return self.lm.logits(hidden)


def frozen_patterns() -> tuple[str, ...]:
  """config.frozen: the ViT and every LM param except the gated blocks (fullmatch regexes;
  scanned `lm/layers/layers/xattn_i/...` or unscanned `lm/layers/layers_j/xattn_i/...`)."""
  return (r"vision/.*", r"lm/(?!layers/layers(_\d+)?/xattn_).*")


def batch_spec(data_config, batch_size: int) -> dict:
  """ShapeDtypeStructs of a batch: N = data.max_images media items of data.frames_per_media
  frames (0: still images), T = data.sequence_length."""
  f32, i32 = jnp.float32, jnp.int32
  size, length, media = data_config.image_size, data_config.sequence_length, data_config.max_images
  frames = data_config.get("frames_per_media", 0)
  image_shape = (batch_size, media) + ((frames,) if frames else ()) + (size, size, 3)
  shapes = {
      "images": (image_shape, f32), "image_mask": ((batch_size, media), f32),
      "image_positions": ((batch_size, media), i32),
      "tokens": ((batch_size, length), i32), "targets": ((batch_size, length), i32),
      "loss_mask": ((batch_size, length), f32), "token_mask": ((batch_size, length), f32),
      "loss_weight": ((batch_size,), f32),
  }
  return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shapes.items()}
