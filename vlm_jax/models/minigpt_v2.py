"""MiniGPT-v2 (arXiv 2310.09478): frozen EVA ViT -> 4-token concat -> linear -> LLaMA-2 + LoRA.

    images [B, N, H, W, 3] -> ViT (frozen, class token dropped, final LayerNorm = ln_vision)
        -> [B*N, P, Dv], P = (H / patch)^2 patches in raster order (stop-gradient)
    concat every `group_size` (4) consecutive tokens: [B*N, P/4, 4*Dv] (1x4 strips in
        raster order, not 2x2 blocks: a plain reshape, as the reference's `view`)
    projection: ONE Linear(4*Dv -> D)                         [B, N, P/4, D]
    tokens -> LM token embeddings; image n's P/4 visual tokens overwrite the embeddings at
        tokens[b, image_positions[b, n] : + P/4] (the `<ImageHere>` slots), where
        image_mask[b, n] > 0
    LM: `vlm_jax.nn.decoder_lm.DecoderLM` (LLaMA-2) with LoRA on `lora_targets`
    -> logits [B, T, V] aligned with `targets`

Batch (fixed shapes; written by `vlm_jax.data.families.minigpt_v2`):

    images          [B, N, H, W, 3] f32  pixels in [-1, 1] (N = 1 in our data)
    image_mask      [B, N] f32           0: image absent, its slots keep the text embedding
    tokens          [B, T] i32           BOS, template, answers; placeholder slots; PAD
    targets         [B, T] i32           next-token targets (used by the loss)
    loss_mask       [B, T] f32           1 on answer tokens and their EOS (used by the loss)
    token_mask      [B, T] f32           1 for real inputs (placeholders included); padding
                                         is masked as keys, so it never changes outputs at
                                         real positions
    image_positions [B, N] i32           index of image n's first slot in `tokens`
    loss_weight     [B] f32              per-example weight (used by the loss)

Trainable in every stage (paper): the projection and the LoRA params; config.frozen freezes
`vision/.*` and `lm/(?!.*/lora_[ab]$).*`. `lm` params load from a LLaMA-2 checkpoint with
`--config.init.lm=PATH` (`PRETRAINED_PARTS`, `vlm_jax.convert`); `vlm-convert export` folds
LoRA into them and writes an HF checkpoint (docs/weights.md).

config.model (`build`): `lm` (DecoderLM fields, LoRA's included), `vision` (ViT fields),
`group_size`.

Generation: `vlm_jax.decode.generate(model, params, batch, max_len)` answers prompts (batch
`tokens`/`token_mask` hold prompts only, e.g. `data.families.minigpt_v2.encode_conversation(
..., open_last=True)`) with the LM's KV cache, through `embed_inputs` / `embed_generated` /
`generation_extra`.
"""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models import registry
from vlm_jax.nn import decoder_lm, embeddings, vit
from vlm_jax.nn import flops as F
from vlm_jax.nn.segment_mask import packed_context


def group_consecutive_tokens(x: jax.Array, group_size: int) -> jax.Array:
  """[..., P, C] -> [..., P / g, g * C]: token i of group j is input token g*j + i."""
  *lead, length, channels = x.shape
  if length % group_size:
    raise ValueError(f"{length} visual tokens are not divisible by group_size={group_size}.")
  return x.reshape(*lead, length // group_size, group_size * channels)


class MiniGPTv2(nn.Module):
  # config.init.<key> -> the params sub-tree it fills; "new": regexes (relative to it) of
  # params no checkpoint has (LoRA's are always new). See vlm_jax/train/init_weights.py.
  PRETRAINED_PARTS = {"lm": {"path": "lm"}, "vision": {"path": "vision"}}

  lm: decoder_lm.DecoderLM  # LLaMA-2 with LoRA on `lora_targets`
  vision: vit.ViT  # EVA ViT (frozen)
  group_size: int = 4  # consecutive visual tokens concatenated per LM token
  dtype: str = "float32"

  def setup(self):
    self.projection = nn.Dense(
        self.lm.width, dtype=jnp.dtype(self.dtype), param_dtype=self.vision.param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                 ("mlp", "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))

  def encode_images(self, images: jax.Array) -> jax.Array:
    """images [B, N, H, W, C] -> visual LM tokens [B, N, P / group_size, D]."""
    batch, num_images = images.shape[:2]
    x = self.vision(images.reshape((-1,) + images.shape[2:]).astype(jnp.dtype(self.dtype)))
    x = jax.lax.stop_gradient(x[:, 1:])  # frozen encoder; class token dropped
    x = group_consecutive_tokens(x, self.group_size)
    x = self.projection(x)
    return x.reshape((batch, num_images) + x.shape[1:])

  def embed_inputs(self, batch) -> tuple[jax.Array, jax.Array, None]:
    """(input embeddings [B, T, D] with the visual tokens spliced in, token_mask [B, T],
    the layers' `extra`: none)."""
    x = self.lm.embed(batch["tokens"])
    visual = self.encode_images(batch["images"])
    x = embeddings.splice(x, visual, batch["image_positions"], batch["image_mask"] > 0)
    return x, batch["token_mask"], None

  def embed_generated(self, tokens: jax.Array) -> jax.Array:
    """Embeddings of generated tokens [B, 1] (decoding)."""
    return self.lm.embed(tokens)

  def generation_extra(self, extra, last):
    """`extra` for a generated token: none here."""
    del last
    return extra

  def __call__(self, batch, deterministic: bool = True):
    x, token_mask, _ = self.embed_inputs(batch)
    hidden = self.lm.trunk(x, token_mask=token_mask, deterministic=deterministic,
                           **packed_context(batch))
    return self.lm.logits(hidden)


def build(model_config) -> MiniGPTv2:
  registry.check_keys(model_config, ("lm", "vision", "group_size"))
  common = registry.common(model_config)
  return MiniGPTv2(lm=registry.part(decoder_lm.DecoderLM, model_config, "lm", **common),
                   vision=registry.part(vit.ViT, model_config, "vision", **common),
                   group_size=model_config.group_size, dtype=model_config.dtype)


def frozen_patterns() -> tuple[str, ...]:
  """config.frozen: the ViT and every LM param except LoRA's (fullmatch regexes)."""
  return (r"vision/.*", r"lm/(?!.*/lora_[ab]$).*")


def batch_spec(data_config, batch_size: int) -> dict:
  """ShapeDtypeStructs of a batch (eval_shape, ahead-of-time compilation, dummy data).

  `data_config.sequence_length` is T (visual slots included); one image per example, or
  with `data_config.packing` `packed_images` per row, per-token weights, segment ids and
  positions (data/packing.py).
  """
  f32, i32 = jnp.float32, jnp.int32
  size, length = data_config.image_size, data_config.sequence_length
  packed = data_config.get("packing", False)
  images = data_config.packed_images if packed else 1
  shapes = {
      "images": ((batch_size, images, size, size, 3), f32),
      "image_mask": ((batch_size, images), f32), "image_positions": ((batch_size, images), i32),
      "tokens": ((batch_size, length), i32), "targets": ((batch_size, length), i32),
      "loss_mask": ((batch_size, length), f32), "token_mask": ((batch_size, length), f32),
      "loss_weight": ((batch_size, length) if packed else (batch_size,), f32),
  }
  if packed:
    shapes.update(segment_ids=((batch_size, length), i32), positions=((batch_size, length), i32))
  return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shapes.items()}


def flops_parts(config, causal_half=True) -> dict:
  """Per row: one example, or with data.packing several sharing the row's T tokens and its
  `packed_images` image slots, each of which the ViT and projection process (empty or not)."""
  lm, vision, data = config.model.lm, config.model.vision, config.data
  patches = (data.image_size // vision.patch_size) ** 2
  images = data.packed_images if data.get("packing", False) else 1
  t, width, heads = data.sequence_length, lm.width, lm.num_heads
  head_dim, kv_heads = width // heads, lm.get("num_kv_heads") or heads
  group = config.model.group_size
  lora_layer = sum(F.dense(t, width, lm.lora_rank)
                   + F.dense(t, lm.lora_rank, (heads if n == "query" else kv_heads) * head_dim)
                   for n in lm.lora_targets)
  return {"vision": images * F.vit(data.image_size, vision.patch_size, vision.width,
                                   vision.depth, vision.num_heads, vision.mlp_dim),
          "projection": images * F.dense(patches // group, group * vision.width, width),
          "lm": lm.num_layers * F.decoder_lm_layer(t, lm, causal_half),
          "lora": lm.num_layers * lora_layer,
          "logits": F.dense(t, width, lm.vocab_size)}


def flops_treatment(config) -> dict:
  """The ViT sits behind a stop-gradient (2N); the LM and its head pass gradients through to
  the projection and LoRA (4N) unless config.frozen leaves them trainable (freeze_lm=False)."""
  lm_frozen = any(re.fullmatch(p, "lm/logits_projection/kernel") for p in config.frozen)
  lm = F.FROZEN_PASSTHROUGH if lm_frozen else F.TRAINABLE
  return {"vision": F.FROZEN_STOPGRAD, "lm": lm, "logits": lm}
