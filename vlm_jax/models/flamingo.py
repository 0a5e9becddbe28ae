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

config.model (`build`): `lm` (DecoderLM fields), `vision` (ViT fields), `resampler`
(PerceiverResampler fields; `num_frames` > 0: video with time embeddings), `xattn`
(GatedCrossAttentionDense fields), `xattn_group`, `xattn_sublayers`,
`only_attend_immediate`, `new_token_ids`.
    -> logits [B, T, V] aligned with `targets`

Masking: token t cross-attends to the visual tokens of the most recent present media item
whose `<image>` token is at or before t (`only_attend_immediate=False`: all of them); tokens
before any item get zero cross-attention output; absent items are never attended.

Packed rows (config.data.packing, data/packing.py): several documents share a row and its
`packed_images` media slots, with `segment_ids` and per-document `positions` [B, T]; the
LM's self-attention is causal inside each document, and an item is visible only to the
tokens of the document its `<image>` token belongs to (the rule above applied within the
document); the resampler works on each item alone.

Batch (fixed shapes; written by `vlm_jax.data.families.flamingo`):

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
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.models import registry
from vlm_jax.nn import decoder_lm, embeddings, gated_xattn, resampler, segment_mask, vit
from vlm_jax.nn import flops as F


def openflamingo_placement(interval: int) -> tuple[int, tuple[int, ...]]:
  """(xattn_group, xattn_sublayers) for a block before layer i when (i+1) % interval == 0."""
  return interval, (interval - 1,)


class FlamingoLayerGroup(decoder_lm.DecoderLayerGroup):
  """`group_size` LM sublayers with a gated cross-attention block before those listed."""
  xattn_sublayers: tuple[int, ...] = (0,)
  xattn: dict = flax.core.FrozenDict()  # GatedCrossAttentionDense fields

  def before_sublayer(self, index, x, context, deterministic, decode):
    del deterministic
    if index not in self.xattn_sublayers:
      return x
    return gated_xattn.GatedCrossAttentionDense(
        **self.xattn, attention_impl=self.attention_impl, dtype=self.dtype,
        param_dtype=self.param_dtype, name=f"xattn_{index}")(
            x, context.extra["media"], context.extra["media_mask"], decode=decode)


class Flamingo(nn.Module):
  # `--config.init.lm` / `--config.init.vision` (vlm_jax/convert): the gated blocks inside the
  # LM's layer groups are new and keep their initialisation.
  PRETRAINED_PARTS = {"lm": {"path": "lm", "new": (r"layers/.*xattn_\d+/.*",)},
                      "vision": {"path": "vision"}}

  lm: decoder_lm.DecoderLM  # frozen; its layers are FlamingoLayerGroups
  vision: vit.ViT  # frozen, CLIP layout (class token, ln_pre, quick-GELU, ln_post)
  resampler: resampler.PerceiverResampler  # trainable, in the vision width
  new_token_ids: tuple[int, ...] = (4, 5)  # <image>, <|endofchunk|> (data/vocab.py)
  only_attend_immediate: bool = True
  dtype: str = "float32"

  def setup(self):
    self.new_token_embedding = self.param(
        "new_token_embedding",
        nn.with_logical_partitioning(embeddings.lm_embedding_init(self.lm.width),
                                     (None, "embed")),
        (len(self.new_token_ids), self.lm.width), jnp.dtype(self.lm.param_dtype))

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
    tokens [B, N*L, Dv] and their mask: a SegmentMask, or [B, 1, T, N*L] when every previous
    image is visible)."""
    tokens, segment_ids = batch["tokens"], batch.get("segment_ids")  # packed rows: ids
    media = self.encode_media(batch["images"])
    num_media, tokens_per_media = media.shape[1:3]
    if self.only_attend_immediate:
      mask = gated_xattn.media_segment_mask(batch["image_positions"], batch["image_mask"],
                                            tokens.shape[1], tokens_per_media, segment_ids)
    else:
      mask = gated_xattn.media_attention_mask(batch["image_positions"], batch["image_mask"],
                                              tokens.shape[1], tokens_per_media, False,
                                              segment_ids)
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
    mask = segment_mask.take_query_rows(extra["media_mask"], last)
    return dict(extra, media_mask=mask, media=None)

  def __call__(self, batch, deterministic: bool = True):
    x, token_mask, extra = self.embed_inputs(batch)
    hidden = self.lm.trunk(x, token_mask=token_mask, extra=extra, deterministic=deterministic,
                           **segment_mask.packed_context(batch))
    return self.lm.logits(hidden)


def build(model_config) -> Flamingo:
  c = model_config
  registry.check_keys(c, ("lm", "vision", "resampler", "xattn", "xattn_group",
                          "xattn_sublayers", "only_attend_immediate", "new_token_ids"))
  bad = [i for i in c.xattn_sublayers if not 0 <= i < c.xattn_group]
  if bad or not c.xattn_sublayers:
    raise registry.ConfigError(f"config.model.xattn_sublayers={tuple(c.xattn_sublayers)}: "
                               f"need indices in [0, xattn_group={c.xattn_group}).")
  common = registry.common(c)
  xattn = registry.sub_config(gated_xattn.GatedCrossAttentionDense, c, "xattn")
  lm = registry.part(
      decoder_lm.DecoderLM, c, "lm", layer_cls=FlamingoLayerGroup,
      layers_per_unit=c.xattn_group,
      layer_kwargs={"xattn_sublayers": tuple(c.xattn_sublayers), "xattn": xattn}, **common)
  resample = registry.part(resampler.PerceiverResampler, c, "resampler",
                           dtype=common["dtype"], param_dtype=common["param_dtype"])
  return Flamingo(lm=lm, vision=registry.part(vit.ViT, c, "vision", **common),
                  resampler=resample, new_token_ids=tuple(c.new_token_ids),
                  only_attend_immediate=c.only_attend_immediate, dtype=c.dtype)


def frozen_patterns() -> tuple[str, ...]:
  """config.frozen: the ViT and every LM param except the gated blocks (fullmatch regexes;
  scanned `lm/layers/layers/xattn_i/...` or unscanned `lm/layers/layers_j/xattn_i/...`)."""
  return (r"vision/.*", r"lm/(?!layers/layers(_\d+)?/xattn_).*")


def media_slots(data_config) -> int:
  """N: media items per row (an example's max_images; packed rows' packed_images)."""
  return data_config.packed_images if data_config.get("packing", False) else data_config.max_images


def batch_spec(data_config, batch_size: int) -> dict:
  """ShapeDtypeStructs of a batch: N = `media_slots` media items of data.frames_per_media
  frames (0: still images), T = data.sequence_length; packed rows add per-token weights,
  segment ids and positions (data/packing.py)."""
  f32, i32 = jnp.float32, jnp.int32
  size, length = data_config.image_size, data_config.sequence_length
  media = media_slots(data_config)
  packed = data_config.get("packing", False)
  frames = data_config.get("frames_per_media", 0)
  image_shape = (batch_size, media) + ((frames,) if frames else ()) + (size, size, 3)
  shapes = {
      "images": (image_shape, f32), "image_mask": ((batch_size, media), f32),
      "image_positions": ((batch_size, media), i32),
      "tokens": ((batch_size, length), i32), "targets": ((batch_size, length), i32),
      "loss_mask": ((batch_size, length), f32), "token_mask": ((batch_size, length), f32),
      "loss_weight": ((batch_size, length) if packed else (batch_size,), f32),
  }
  if packed:
    shapes.update(segment_ids=((batch_size, length), i32), positions=((batch_size, length), i32))
  return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shapes.items()}


def flops_parts(config, causal_half=True) -> dict:
  """Per row: N = `media_slots` media items of F frames (F = 1 for images; every slot is
  encoded and cross-attended, empty or not), T text tokens."""
  lm, vision, res, xattn, data = (config.model.lm, config.model.vision, config.model.resampler,
                                  config.model.xattn, config.data)
  frames = max(data.get("frames_per_media", 0), 1)
  media, t = media_slots(data), data.sequence_length
  patches = (data.image_size // vision.patch_size) ** 2
  vw = vision.width
  encoder = F.vit(data.image_size, vision.patch_size, vw, vision.depth, vision.num_heads,
                  vision.mlp_dim)
  latents, inputs = res.num_latents, frames * patches
  r_inner = res.num_heads * res.head_dim
  resampler_layer = (F.dense(latents, vw, r_inner) + F.dense(inputs + latents, vw, 2 * r_inner)
                     + F.dense(latents, r_inner, vw)
                     + 4.0 * latents * (inputs + latents) * r_inner
                     + F.mlp(latents, vw, res.mlp_ratio * vw))
  width = lm.width
  visual_tokens, x_inner = media * latents, xattn.num_heads * xattn.head_dim
  # Every query scores every visual token (the mask only hides some), so no halving.
  xattn_block = (F.dense(t, width, x_inner) + F.dense(visual_tokens, vw, 2 * x_inner)
                 + F.dense(t, x_inner, width) + 4.0 * t * visual_tokens * x_inner
                 + F.mlp(t, width, xattn.mlp_ratio * width))
  blocks = lm.num_layers // config.model.xattn_group * len(config.model.xattn_sublayers)
  return {"vision": media * frames * encoder,
          "resampler": media * res.num_layers * resampler_layer,
          "xattn": blocks * xattn_block,
          "lm": lm.num_layers * F.decoder_lm_layer(t, lm, causal_half),
          "logits": F.dense(t, width, lm.vocab_size)}


def flops_treatment(config) -> dict:
  """Frozen ViT behind a stop-gradient; the frozen LM and head pass gradients down to the
  gated blocks; resampler and gated blocks train."""
  del config  # the LM is frozen in every Flamingo config
  return {"vision": F.FROZEN_STOPGRAD, "lm": F.FROZEN_PASSTHROUGH,
          "logits": F.FROZEN_PASSTHROUGH}


def attention_masks(config, batch, example: int = 0) -> dict:
  """{title: [T, N] bool}: token t cross-attends to media item n
  (`gated_xattn.media_visibility`), for the model notebook."""
  segment_ids = batch.get("segment_ids")
  visible = gated_xattn.media_visibility(
      jnp.asarray(batch["image_positions"][example:example + 1]),
      jnp.asarray(batch["image_mask"][example:example + 1]), batch["tokens"].shape[1],
      config.model.only_attend_immediate,
      None if segment_ids is None else jnp.asarray(segment_ids[example:example + 1]))
  return {"media visible to each token": np.asarray(visible[0])}
