"""CogAgent (arXiv 2312.08914): low-res image tokens in the LM + a high-res cross-module.

    images [B, N, h, w, 3] (224 px) -> low-res ViT (EVA2-CLIP-E; frozen: stop-gradient;
        class token dropped; the release's layout: EVA2_CLIP_LAYOUT) -> [B*N, P, Dv]
      -> GLU adapter: Linear(Dv -> D) -> LayerNorm -> GELU -> SwiGLU MLP (D -> F -> D)
      -> [boi ; P tokens ; eoi] (learned boi/eoi)                      [B, N, P + 2, D]
    tokens -> LM token embeddings; image n's P + 2 tokens overwrite the embeddings at
        tokens[b, image_positions[b, n] : + P + 2] where image_mask[b, n] > 0; those
        positions are the image tokens (`is_vision`) the visual expert routes
    high_res_images [B, N, H, W, 3] (1120 px) -> high-res ViT (EVA-02-L: EVA02_LAYOUT in the
        release; class token dropped) -> [B, N * (H / 14)^2, Dc]
    LM: `vlm_jax.nn.decoder_lm.DecoderLM` (Vicuna-7B = LLaMA) with `CogAgentLayer`:
        x = x + SelfAttn(RMSNorm(x))         visual expert: routed q/k/v/out (option)
        x = x + CrossAttn(RMSNorm(x), high)  q D -> Cw, k/v Dc -> Cw, out Cw -> D, no bias,
                                             `cross_heads` heads; every position sees
                                             every high-res token (no mask, no gate)
        x = x + MLP(RMSNorm(x))              visual expert: routed SwiGLU (option)
    -> logits [B, T, V] aligned with `targets`

Batch (fixed shapes; written by `vlm_jax.data.families.cogagent`):

    images          [B, N, h, w, 3] f32  low-res pixels in [-1, 1] (N = 1 in our data)
    high_res_images [B, N, H, W, 3] f32  the same image at high resolution, in [-1, 1]
    image_mask      [B, N] f32           0: low-res image absent (its slots keep the text
                                         embeddings and count as text); the high-res
                                         tokens are always attended
    tokens          [B, T] i32           BOS, image slots, prompt, answer, EOS, PAD
    targets         [B, T] i32           next-token targets (used by the loss)
    loss_mask       [B, T] f32           1 on answer tokens and their EOS (used by the loss)
    token_mask      [B, T] f32           1 for real inputs (image slots included)
    image_positions [B, N] i32           index of image n's first slot (its boi)
    loss_weight     [B] f32              per-example weight (used by the loss)

Packed rows (config.data.packing, data/packing.py): N = `packed_images` slots per row, one
per example (image_mask 0 marks the unused ones, whose high-res tokens no token attends),
loss_weight [B, T], plus segment_ids and positions [B, T]. Self-attention is causal inside
each example (`segment_mask.packed`), rotary positions restart per example, and a token
cross-attends only the high-res tokens of its own example's slot
(`segment_mask.packed_cross`); the visual expert routes each example's image slots as
unpacked.

config.model (`build`): `lm` (DecoderLM fields), `vision` and `high_res` (ViT fields),
`adapter` (`mlp_dim`), `cross` (`width`, `heads` of the cross-attention), `visual_expert`,
`cross_module` (False removes the high-res branch and the cross-attention: the low-res-only
model, CogVLM's layout, e.g. for the FLOPs comparison at 490 px in docs/models.md).
Training stages (paper, `frozen_patterns(stage)`): the low-res ViT is always frozen.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.models import registry
from vlm_jax.nn import attention as attention_lib
from vlm_jax.nn import decoder_lm, embeddings, mlp as mlp_lib, norms, segment_mask, transformer
from vlm_jax.nn import flops as F
from vlm_jax.nn import visual_expert, vit


class CogAgentLayer(transformer.Layer):
  """Self-attention, cross-attention to `context.extra['high_res']`, MLP (pre-norm)."""
  cross_width: int = 1024  # 0: no cross-attention (low-res-only model)
  cross_heads: int = 32
  visual_expert: bool = False  # routes by context.extra['is_vision'] [B, T]

  def attention_branch(self, x, context, deterministic, decode):
    if not self.visual_expert:
      return super().attention_branch(x, context, deterministic, decode)
    attention = visual_expert.ExpertAttention(
        num_heads=self.num_heads, head_dim=self.head_dim, num_kv_heads=self.num_kv_heads,
        use_bias=self.use_bias, use_rotary=self.use_rotary,
        rotary_max_wavelength=self.rotary_max_wavelength, attention_impl=self.attention_impl,
        dtype=self.dtype, param_dtype=self.param_dtype, is_vision=context.extra["is_vision"],
        name="self_attention")
    return attention(self.norm("pre_attention_norm")(x), mask=context.mask,
                     positions=context.positions, decode=decode)

  def mlp_branch(self, x, context, deterministic):
    if not self.visual_expert:
      return super().mlp_branch(x, context, deterministic)
    h = self.norm("pre_mlp_norm")(x)
    vision = mlp_lib.Mlp(self.mlp_dim, self.mlp_activation, use_bias=self.use_bias,
                         dropout_rate=self.dropout_rate, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="vision_mlp")
    return visual_expert.select(context.extra["is_vision"], vision(h, deterministic),
                                self.mlp_module()(h, deterministic))

  def cross_attention_block(self, x, context, deterministic, decode):
    attention = attention_lib.MultiHeadAttention(
        num_heads=self.cross_heads, head_dim=self.cross_width // self.cross_heads,
        use_bias=False, attention_impl=self.attention_impl, dtype=self.dtype,
        param_dtype=self.param_dtype, name="cross_attention")
    high_res = context.extra["high_res"]  # None while decoding: the cached keys/values
    h = attention(self.norm("pre_cross_attention_norm")(x), high_res,
                  mask=context.extra.get("high_res_mask"), decode=decode,
                  kv_from_cache=decode and high_res is None)
    return self.residual(x, h, deterministic)

  @nn.compact
  def __call__(self, x, context, deterministic: bool = True, decode: bool = False):
    if self.parallel_residual or self.lora_targets:
      raise ValueError("CogAgentLayer supports neither parallel_residual nor LoRA.")
    if self.cross_width % self.cross_heads:
      raise ValueError(f"cross_width={self.cross_width} is not a multiple of "
                       f"cross_heads={self.cross_heads}.")
    x = self.self_attention_block(x, context, deterministic, decode)
    if self.cross_width:
      x = self.cross_attention_block(x, context, deterministic, decode)
    return self.mlp_block(x, context, deterministic)


class GluAdapter(nn.Module):
  """CogVLM's projector: Linear -> LayerNorm -> GELU -> SwiGLU MLP, no biases; plus the
  learned begin/end-of-image embeddings around the visual tokens."""
  width: int
  mlp_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x [B, P, Dv] -> [B, P + 2, D]."""
    x = nn.Dense(self.width, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                          ("mlp", "embed")),
                 name="linear_proj")(x)
    x = nn.gelu(norms.LayerNorm(1e-5, dtype=self.dtype, param_dtype=self.param_dtype,
                                name="norm")(x), approximate=False)
    x = mlp_lib.Mlp(self.mlp_dim, "swiglu", use_bias=False, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="glu")(x)
    boundary = lambda name: jnp.broadcast_to(self.param(
        name, nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
        (self.width,), self.param_dtype).astype(x.dtype), (x.shape[0], 1, self.width))
    return jnp.concatenate([boundary("boi"), x, boundary("eoi")], axis=1)


class CogAgent(nn.Module):
  lm: decoder_lm.DecoderLM  # Vicuna / LLaMA with CogAgentLayers
  vision: vit.ViT  # low-res encoder (EVA2-CLIP-E), frozen
  adapter: GluAdapter
  high_res: vit.ViT | None = None  # EVA-02-L; None: the low-res-only model
  dtype: str = "float32"

  def encode_images(self, images: jax.Array) -> jax.Array:
    """Low-res images [B, N, h, w, C] -> [boi ; visual ; eoi] LM tokens [B, N, P + 2, D]."""
    batch, num_images = images.shape[:2]
    x = self.vision(images.reshape((-1,) + images.shape[2:]).astype(jnp.dtype(self.dtype)))
    x = self.adapter(jax.lax.stop_gradient(x[:, 1:]))  # frozen encoder; class token dropped
    return x.reshape((batch, num_images) + x.shape[1:])

  def encode_high_res(self, images: jax.Array) -> jax.Array:
    """High-res images [B, N, H, W, C] -> cross-attention keys [B, N * (H/14)^2, Dc]."""
    batch = images.shape[0]
    x = self.high_res(images.reshape((-1,) + images.shape[2:]).astype(jnp.dtype(self.dtype)))
    return x[:, 1:].reshape(batch, -1, x.shape[-1])

  def embed_inputs(self, batch) -> tuple[jax.Array, jax.Array, dict]:
    """(input embeddings [B, T, D], token_mask [B, T], the layers' `extra`)."""
    x = self.lm.embed(batch["tokens"])
    visual = self.encode_images(batch["images"])
    present = batch["image_mask"] > 0
    x = embeddings.splice(x, visual, batch["image_positions"], present)
    offsets = jnp.arange(x.shape[1])[None, None, :] - batch["image_positions"][..., None]
    in_image = (offsets >= 0) & (offsets < visual.shape[2]) & present[..., None]
    extra = {"is_vision": jnp.any(in_image, axis=1)}
    if self.high_res is not None:
      extra["high_res"] = self.encode_high_res(batch["high_res_images"])
      if "segment_ids" in batch:  # packed rows: each token sees its own example's image
        slots = segment_mask.slot_segment_ids(batch["segment_ids"], batch["image_positions"],
                                              batch["image_mask"])
        extra["high_res_mask"] = segment_mask.packed_cross(
            batch["segment_ids"], slots, extra["high_res"].shape[1] // slots.shape[1])
    return x, batch["token_mask"], extra

  def embed_generated(self, tokens: jax.Array) -> jax.Array:
    """Embeddings of generated tokens [B, 1] (decoding, `vlm_jax.decode`)."""
    return self.lm.embed(tokens)

  def generation_extra(self, extra: dict, last: jax.Array) -> dict:
    """`extra` for one generated token: text (no visual expert); the high-res keys/values
    the prompt cached (high_res None)."""
    step = dict(extra, is_vision=jnp.zeros((last.shape[0], 1), bool))
    if "high_res" in step:
      step["high_res"] = None
    return step

  def __call__(self, batch, deterministic: bool = True):
    x, token_mask, extra = self.embed_inputs(batch)
    hidden = self.lm.trunk(x, token_mask=token_mask, extra=extra, deterministic=deterministic,
                           **segment_mask.packed_context(batch))
    return self.lm.logits(hidden)


# The released towers' ViT layouts (nn/eva.py; vlm_jax/convert/cogagent.py has the names):
# low-res EVA2-CLIP-E as CogVLM's visual.py (each branch's output normalised, no final norm,
# `pos_embed` added to the patch tokens before the adapter; CogVLM has no `pos_embed`);
# high-res EVA-02-L as cross_visual.py (the output is the patch tokens of its last layer but
# one, no final norm, plus `pos_embed`: the release has one more block, unused).
EVA2_CLIP_LAYOUT = dict(mlp_activation="gelu", class_token=True, branch_norm="post",
                        post_norm="none", output_pos_embedding=True)
EVA02_LAYOUT = dict(mlp_activation="swiglu", class_token=True, rotary_2d=True,
                    rotary_reference_grid=16, sub_norm=True, qkv_bias="qv", post_norm="none",
                    output_pos_embedding=True)


def build(model_config) -> CogAgent:
  c = model_config
  registry.check_keys(c, ("lm", "vision", "adapter", "high_res", "cross", "visual_expert",
                          "cross_module"))
  common = registry.common(c)
  lm = registry.part(
      decoder_lm.DecoderLM, c, "lm", layer_cls=CogAgentLayer,
      layer_kwargs=dict(cross_width=c.cross.width if c.cross_module else 0,
                        cross_heads=c.cross.heads, visual_expert=c.visual_expert), **common)
  adapter = GluAdapter(c.lm.width, c.adapter.mlp_dim, common["dtype"], common["param_dtype"])
  high_res = registry.part(vit.ViT, c, "high_res", **common) if c.cross_module else None
  return CogAgent(lm=lm, vision=registry.part(vit.ViT, c, "vision", **common), adapter=adapter,
                  high_res=high_res, dtype=c.dtype)


_CROSS = r"cross_attention/|pre_cross_attention_norm/"
_EXPERT = r"vision_mlp/|self_attention/vision_"
# stage -> config.frozen (fullmatch regexes; layers are `layers/layers/...` when scanned,
# `layers/layers_i/...` when not): 0 trains everything but the low-res ViT; 1 (the paper's
# first pre-training phase) only the high-res cross-module; 2 also the visual expert.
STAGES = {
    0: (r"vision/.*",),
    1: (r"vision/.*", r"adapter/.*", rf"lm/(?!layers/layers[^/]*/({_CROSS})).*"),
    2: (r"vision/.*", r"adapter/.*", rf"lm/(?!layers/layers[^/]*/({_CROSS}|{_EXPERT})).*"),
}


def frozen_patterns(stage: int) -> tuple[str, ...]:
  if stage not in STAGES:
    raise ValueError(f"cogagent stage={stage}: expected one of {sorted(STAGES)}.")
  return STAGES[stage]


def image_tokens(image_size: int, patch_size: int) -> int:
  """LM slots per low-res image: (size / patch)^2 visual tokens + boi + eoi."""
  return (image_size // patch_size) ** 2 + 2


def batch_spec(data_config, batch_size: int) -> dict:
  """ShapeDtypeStructs of a batch (eval_shape, ahead-of-time compilation, dummy data).

  `data_config.sequence_length` is T (image slots included); one image per example, or
  with `data_config.packing` `packed_images` per row, per-token weights, segment ids and
  positions (data/packing.py).
  """
  f32, i32 = jnp.float32, jnp.int32
  low, high, length = data_config.image_size, data_config.high_res_image_size, \
      data_config.sequence_length
  packed = data_config.get("packing", False)
  images = data_config.packed_images if packed else 1
  shapes = {
      "images": ((batch_size, images, low, low, 3), f32),
      "high_res_images": ((batch_size, images, high, high, 3), f32),
      "image_mask": ((batch_size, images), f32),
      "tokens": ((batch_size, length), i32), "targets": ((batch_size, length), i32),
      "loss_mask": ((batch_size, length), f32), "token_mask": ((batch_size, length), f32),
      "image_positions": ((batch_size, images), i32),
      "loss_weight": ((batch_size, length) if packed else (batch_size,), f32),
  }
  if packed:
    shapes.update(segment_ids=((batch_size, length), i32), positions=((batch_size, length), i32))
  return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shapes.items()}


def flops_parts(config, causal_half=True) -> dict:
  """'lm' counts each token through one weight set (the model FLOPs of a routed visual
  expert); 'visual_expert' is the second set that fixed shapes also apply to every token.
  Per row: one example, or with data.packing several sharing its T tokens and its
  `packed_images` slots, each of which both ViTs and the adapter process (empty or not) and
  every token's cross-attention scores (masked to its own example's)."""
  m, data = config.model, config.data
  lm, vision = m.lm, m.vision
  images = data.packed_images if data.get("packing", False) else 1
  patches = (data.image_size // vision.patch_size) ** 2
  t, width, heads = data.sequence_length, lm.width, lm.num_heads
  head_dim, kv_heads = width // heads, lm.get("num_kv_heads") or heads
  parts = {
      "vision": images * F.vit(data.image_size, vision.patch_size, vision.width, vision.depth,
                               vision.num_heads, vision.mlp_dim),
      "adapter": images * (F.dense(patches, vision.width, width)
                           + F.mlp(patches, width, m.adapter.mlp_dim, "swiglu")),
      "lm": lm.num_layers * F.decoder_lm_layer(t, lm, causal_half),
      "logits": F.dense(t, width, lm.vocab_size),
  }
  if m.visual_expert:
    projections = (F.dense(t, width, heads * head_dim)
                   + F.dense(t, width, 2 * kv_heads * head_dim)
                   + F.dense(t, heads * head_dim, width))
    parts["visual_expert"] = lm.num_layers * (projections
                                              + F.mlp(t, width, lm.mlp_dim, "swiglu"))
  if m.cross_module:
    high = m.high_res
    keys = images * (data.high_res_image_size // high.patch_size) ** 2
    cw = m.cross.width
    parts["high_res"] = images * F.vit(data.high_res_image_size, high.patch_size, high.width,
                                       high.depth, high.num_heads, high.mlp_dim,
                                       mlp_activation=high.get("mlp_activation", "gelu"))
    parts["cross_attention"] = lm.num_layers * (
        F.dense(t, width, cw) + F.dense(keys, high.width, 2 * cw) + F.dense(t, cw, width)
        + 2 * 2.0 * t * keys * cw)
  return parts


def flops_treatment(config) -> dict:
  """The low-resolution ViT is frozen behind a stop-gradient; everything else trains."""
  del config
  return {"vision": F.FROZEN_STOPGRAD}


def attention_masks(config, batch, example: int = 0) -> dict:
  """The LM's self-attention mask (causal over [BOS ; image slots ; text], padding masked),
  the cross-module's (every token sees every high-res token) and the positions the visual
  expert routes (image slots), for the model notebook."""
  token_mask = jnp.asarray(batch["token_mask"][example:example + 1]) > 0
  length = token_mask.shape[1]
  self_mask = attention_lib.causal_mask(length) & attention_lib.padding_mask(None, token_mask)
  slots = image_tokens(config.data.image_size, config.model.vision.patch_size)
  start = int(batch["image_positions"][example, 0])
  is_vision = np.zeros(length, bool)
  is_vision[start:start + slots] = batch["image_mask"][example, 0] > 0
  high_res = (config.data.high_res_image_size // config.model.high_res.patch_size) ** 2
  return {"LM self-attention": np.asarray(self_mask[0, 0]),
          "cross-module (high-res)": np.ones((length, high_res), bool),
          "visual expert routing": is_vision[None]}
