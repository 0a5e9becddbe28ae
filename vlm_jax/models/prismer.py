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

Packed rows (config.data.packing, data/families/prismer.py): T = `sequence_length`, each
image key gets a slot axis of `packed_images` ([B, K, ...]; image_mask [B, K] marks the used
slots, image_positions [B, K] the row index where each slot's example starts), loss_weight
[B, T], segment_ids and positions [B, T]. Each slot is encoded on its own (encoded: the
slots' S tokens one after another); the decoder's self-attention is causal inside each
example (`segment_mask.packed`), its learned positions restart per example, and a token
cross-attends only its own example's slot (`segment_mask.packed_cross`).

Batch (fixed shapes; written by `vlm_jax.data.families.prismer`):

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

config.model (`build`): `lm` (`RobertaConfig`: the decoder), `vision` (`PrismerVision`
fields: the ViT, its experts and their resampler), `adaptor_ratio` (both backbones'
adaptors), `freeze`, `dropout_rate`.

Freezing (`frozen_patterns(mode)`, the reference's `prepare_to_train`): 'freeze_lang_vision'
(pretraining) freezes the ViT layers except their adaptors, and the decoder layers'
self-attention and MLP (with their norms); 'freeze_vision' (fine-tuning) only the former;
'none' nothing. Stems, resampler, patch conv, position grid, LN_pre/LN_post, word and
position embeddings, cross-attention, adaptors, the output layer and the LM head train.
With `vision.expert_stem_norm='batch'` (Prismer's released stems) the stems' running mean/var
are STATISTICS: frozen in every mode.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models import registry
from vlm_jax.nn import adaptor as adaptor_lib
from vlm_jax.nn import attention as attention_lib
from vlm_jax.nn import embeddings, expert_stem, norms, segment_mask, transformer
from vlm_jax.nn import flops as F
from vlm_jax.nn.expert_vit import (DENSE_EXPERTS, INSTANCES_KEY, LABEL_EXPERTS, PrismerVision,
                                   check_experts, expert_key)

FREEZE_MODES = ("freeze_lang_vision", "freeze_vision", "freeze_lang", "none")
_VISION_FROZEN = r"vision/encoder/layers(_\d+)?/(?!adaptor/).*"
_LANG_FROZEN = (r"decoder/layers(_\d+)?/"
                r"(self_attention|self_attention_norm|mlp|mlp_norm)/.*")

# BatchNorm running statistics of the expert stems (expert_stem_norm='batch'), never trained.
STATISTICS = (r"vision/embedder/stem_\w+/norm_\d+/(mean|var)",)


def frozen_patterns(mode: str) -> tuple[str, ...]:
  """config.frozen for a reference freezing mode (fullmatch regexes over param paths)."""
  if mode not in FREEZE_MODES:
    raise ValueError(f"freeze={mode!r}: expected one of {FREEZE_MODES}.")
  return {"freeze_lang_vision": (_VISION_FROZEN, _LANG_FROZEN),
          "freeze_vision": (_VISION_FROZEN,), "freeze_lang": (_LANG_FROZEN,),
          "none": ()}[mode]


class RobertaLayer(transformer.Layer):
  """Post-LN RoBERTa layer, optionally with Prismer's cross-attention + adaptor.

      x = LN(x + SelfAttn(x))                        self_attention, self_attention_norm
      x = LN(x + CrossAttn(x, encoded))              cross_attention, cross_attention_norm
      x = Adaptor_late(x)                            adaptor
      x = LN(x + MLP(x))                             mlp, mlp_norm
  """
  cross_attention: bool = True
  adaptor_ratio: int = 1

  def post_norm(self, x, branch, name, deterministic):
    branch = nn.Dropout(self.dropout_rate)(branch, deterministic=deterministic)
    return nn.with_logical_constraint(self.norm(name)(x + branch), ("batch", "length", "embed"))

  @nn.compact
  def __call__(self, x, context, deterministic: bool = True, decode: bool = False):
    h = self.attention_module(deterministic)(x, mask=context.mask, decode=decode)
    x = self.post_norm(x, h, "self_attention_norm", deterministic)
    if self.cross_attention:
      h = self.attention_module(deterministic, "cross_attention")(
          x, context.encoded, mask=context.cross_mask, decode=decode,
          kv_from_cache=decode and context.encoded is None)
      x = self.post_norm(x, h, "cross_attention_norm", deterministic)
      x = adaptor_lib.Adaptor(self.adaptor_ratio, norm_late=True, norm_epsilon=self.norm_epsilon,
                              dtype=self.dtype, param_dtype=self.param_dtype, name="adaptor")(x)
    return self.post_norm(x, self.mlp_module()(x, deterministic), "mlp_norm", deterministic)


@dataclasses.dataclass(frozen=True)
class RobertaConfig:
  """The RoBERTa decoder (config.model.lm)."""
  vocab_size: int
  width: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  max_text_length: int = 514  # rows of the position table (RoBERTa: 514)
  position_offset: int = 2  # RoBERTa's first position id (padding_idx + 1)


class Prismer(nn.Module):
  # `--config.init.lm=PATH` (a RoBERTa checkpoint, vlm_jax/convert/roberta.py) fills the
  # decoder; cross-attention, adaptors and the extra output layer keep their initialisation.
  PRETRAINED_PARTS = {"lm": {
      "path": "", "arch": "roberta", "exclude": (r"vision/.*",),
      "new": (r"decoder/layers(_\d+)?/(cross_attention|cross_attention_norm|adaptor)/.*",
              r"output_layer/.*")}}

  lm: RobertaConfig
  vision: PrismerVision  # the adapted ViT with the experts' stems and resampler
  # Which backbones config.frozen freezes (`frozen_patterns(freeze)`); the model only checks
  # it, `flops_treatment` reads it to apply the frozen-part FLOPs rules.
  freeze: str = "freeze_lang_vision"
  adaptor_ratio: int = 1  # bottleneck ratio: adaptor hidden = width // adaptor_ratio
  dropout_rate: float = 0.0
  scan_layers: bool = True
  remat_policy: str = "none"
  attention_impl: str = "xla"  # xla | splash | cudnn (nn/fused_attention.py)
  dtype: str = "float32"
  param_dtype: str = "float32"

  @property
  def experts(self) -> tuple[str, ...]:
    return tuple(self.vision.experts)

  def setup(self):
    check_experts(self.experts)
    frozen_patterns(self.freeze)
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    lm = self.lm
    # RoBERTa's N(0, 0.02) init (nn.Embed's is N(0, 1)): the table also gives the tied logits.
    self.word_embedding = self.param(
        "word_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                       ("vocab", "embed")),
        (lm.vocab_size, lm.width), param_dtype)
    self.pos_embedding = embeddings.PositionEmbedding((lm.max_text_length,), lm.width,
                                                      param_dtype=param_dtype)
    self.token_type_embedding = self.param(
        "token_type_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                             ("embed",)),
        (lm.width,), param_dtype)
    self.embed_norm = norms.LayerNorm(1e-5, True, dtype, param_dtype)
    self.embed_dropout = nn.Dropout(self.dropout_rate)
    layer_kwargs = dict(num_heads=lm.num_heads, head_dim=lm.width // lm.num_heads,
                        mlp_dim=lm.mlp_dim, norm_epsilon=1e-5,
                        adaptor_ratio=self.adaptor_ratio, dropout_rate=self.dropout_rate,
                        attention_impl=self.attention_impl, dtype=dtype, param_dtype=param_dtype)
    self.decoder = transformer.layer_stack(
        RobertaLayer, num_layers=lm.num_layers, scan_layers=self.scan_layers,
        remat_policy=self.remat_policy, cross_attention=True, **layer_kwargs)
    self.output_layer = RobertaLayer(cross_attention=False, **layer_kwargs)
    self.lm_head_dense = nn.Dense(
        lm.width, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                 ("embed", "mlp")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))
    self.lm_head_norm = norms.LayerNorm(1e-5, True, dtype, param_dtype)
    self.lm_head_bias = self.param(
        "lm_head_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
        (lm.vocab_size,), param_dtype)

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
    """The adapted ViT's output [B, S, Dv] (S = h*w, + num_latents with experts); packed
    rows: [B, K * S, Dv], slot after slot."""
    maps, instances = self.expert_inputs(batch)
    images = batch["images"]
    if "segment_ids" not in batch:
      return self.vision(images[:, 0], maps, instances, deterministic)
    slots = lambda a: None if a is None else a.reshape((-1,) + a.shape[2:])
    encoded = self.vision(slots(images), {k: slots(v) for k, v in maps.items()},
                          slots(instances), deterministic)
    return encoded.reshape((images.shape[0], -1) + encoded.shape[2:])

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
    x = self.embed_text(tokens, positions, deterministic)
    self_mask = attention_lib.decoder_self_mask(tokens.shape[1], token_mask, key_mask, decode)
    cross_mask = (None if encoder_mask is None
                  else segment_mask.key_padding(encoder_mask, tokens.shape[1]))
    context = transformer.LayerContext(mask=self_mask, encoded=encoded, cross_mask=cross_mask)
    return self.decoder_logits(x, context, deterministic, decode)

  def embed_text(self, tokens, positions=None, deterministic: bool = True) -> jax.Array:
    """Decoder input embeddings [B, T, D]: words + learned positions + token type, normed."""
    lm = self.lm
    if positions is None:
      length = tokens.shape[1]
      if length + lm.position_offset > lm.max_text_length:
        raise ValueError(f"text length {length} + position_offset {lm.position_offset} "
                         f"exceeds config.model.lm.max_text_length={lm.max_text_length}.")
      positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
    pos = jnp.take(self.pos_embedding(), positions + lm.position_offset, axis=0)
    words = jnp.take(self.word_embedding, tokens, axis=0).astype(self.dtype)
    x = words + pos.astype(self.dtype) + self.token_type_embedding.astype(self.dtype)
    return self.embed_dropout(self.embed_norm(x), deterministic=deterministic)

  def packed_context(self, batch, encoded) -> transformer.LayerContext:
    """The decoder's masks for packed rows (module docstring) attending to `encoded`."""
    segments = batch["segment_ids"]
    slots = segment_mask.slot_segment_ids(segments, batch["image_positions"],
                                          batch["image_mask"])
    return transformer.LayerContext(
        mask=segment_mask.packed(segments), encoded=encoded,
        cross_mask=segment_mask.packed_cross(segments, slots,
                                             encoded.shape[1] // slots.shape[1]))

  def decoder_logits(self, x, context, deterministic: bool = True, decode: bool = False):
    """Decoder input embeddings [B, T, D] -> logits [B, T, V] (the layers, the LM head)."""
    x = self.decoder(x, context, deterministic, decode)
    x = self.output_layer(x, context, deterministic, decode)
    x = self.lm_head_norm(nn.gelu(self.lm_head_dense(x), approximate=False))
    logits = jnp.einsum("BTD,VD->BTV", x, self.word_embedding.astype(self.dtype))
    logits = logits + self.lm_head_bias.astype(self.dtype)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

  def __call__(self, batch, deterministic: bool = True):
    encoded = self.encode_images(batch, deterministic)
    if "segment_ids" not in batch:
      return self.decode(encoded, None, batch["tokens"], batch["loss_mask"],
                         deterministic=deterministic)
    x = self.embed_text(batch["tokens"], batch["positions"], deterministic)
    return self.decoder_logits(x, self.packed_context(batch, encoded), deterministic)


def build(model_config) -> Prismer:
  c = model_config
  registry.check_keys(c, ("lm", "vision", "freeze", "adaptor_ratio", "dropout_rate"))
  common = registry.common(c)
  vision = registry.part(PrismerVision, c, "vision", adaptor_ratio=c.adaptor_ratio,
                         dropout_rate=c.dropout_rate, **common)
  return Prismer(lm=RobertaConfig(**registry.sub_config(RobertaConfig, c, "lm")),
                 vision=vision, freeze=c.freeze, adaptor_ratio=c.adaptor_ratio,
                 dropout_rate=c.dropout_rate, scan_layers=c.scan_layers,
                 remat_policy=c.remat_policy, attention_impl=c.attention_impl, dtype=c.dtype,
                 param_dtype=c.param_dtype)


def batch_spec(data_config, batch_size: int) -> dict:
  """ShapeDtypeStructs of a batch (eval_shape, ahead-of-time compilation, dummy data); with
  `data_config.packing` rows of `sequence_length` tokens and `packed_images` slots."""
  f32, i32 = jnp.float32, jnp.int32
  size, label = data_config.image_size, data_config.expert_size
  packed = data_config.get("packing", False)
  length = data_config.sequence_length if packed else data_config.text_length
  image_slots = data_config.packed_images if packed else 1
  maps = (batch_size, image_slots) if packed else (batch_size,)  # expert maps' leading axes
  shapes = {
      "images": ((batch_size, image_slots, size, size, 3), f32),
      "tokens": ((batch_size, length), i32), "targets": ((batch_size, length), i32),
      "loss_mask": ((batch_size, length), f32),
      "loss_weight": ((batch_size, length) if packed else (batch_size,), f32),
  }
  if packed:
    shapes.update(image_mask=(maps, f32), image_positions=(maps, i32),
                  segment_ids=((batch_size, length), i32), positions=((batch_size, length), i32))
  for name in check_experts(data_config.experts):
    channels = DENSE_EXPERTS.get(name, data_config.label_dim)
    shapes[expert_key(name)] = (maps + (label, label, channels), f32)
    if name == "obj_detection":
      shapes[INSTANCES_KEY] = (maps + (label, label), i32)
  return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shapes.items()}


def flops_parts(config, causal_half=True) -> dict:
  """Parts by how training treats them (`flops_treatment`): the frozen ViT and RoBERTa
  layers are separate from the adaptors, cross-attention and everything else trainable.
  Packed rows: T = sequence_length, and the vision parts and the cross-attention keys count
  every one of the `packed_images` slots (used or not)."""
  lm, vision, data = config.model.lm, config.model.vision, config.data
  packed = data.get("packing", False)
  images = data.packed_images if packed else 1
  vw, p, experts = vision.width, vision.patch_size, tuple(vision.experts)
  grid, expert_grid = data.image_size // p, data.expert_size // p
  vheads = vision.num_heads
  stems = F.dense(grid * grid, p * p * 3, vw)
  latents = vision.num_latents if experts else 0
  if experts:
    for name in experts:
      label = name in LABEL_EXPERTS
      channels = data.label_dim if label else DENSE_EXPERTS[name]
      stems += F.expert_stem(expert_grid, vw, channels,
                             expert_stem.LABEL_STRIDES if label else expert_stem.DENSE_STRIDES,
                             data.expert_size)
    keys = len(experts) * expert_grid ** 2 + latents
    rheads = vision.resampler_heads
    stems += vision.resampler_layers * (F.attention(latents, keys, vw, rheads, vw // rheads)
                                        + F.mlp(latents, vw, 4 * vw))
  n = grid * grid + latents
  vit_layer = F.attention(n, n, vw, vheads, vw // vheads) + F.mlp(n, vw, vision.mlp_dim)
  ratio = config.model.adaptor_ratio
  t = data.sequence_length if packed else data.text_length
  width, heads = lm.width, lm.num_heads
  self_layer = (F.attention(t, t, width, heads, width // heads, causal_half=causal_half)
                + F.mlp(t, width, lm.mlp_dim))
  keys = images * n
  cross = (F.dense(t, width, width) + F.dense(keys, vw, 2 * width) + F.dense(t, width, width)
           + 2 * 2.0 * t * keys * width)
  return {
      "vision_stems": images * stems,
      "vision_layers": images * vision.depth * vit_layer,
      "vision_adaptors": images * vision.depth * 2 * F.dense(n, vw, vw // ratio),
      "decoder_layers": lm.num_layers * self_layer,
      "decoder_cross": lm.num_layers * (cross + 2 * F.dense(t, width, width // ratio)),
      "output_layer": self_layer,
      "logits": F.dense(t, width, width) + F.dense(t, width, lm.vocab_size),
  }


def flops_treatment(config) -> dict:
  """Frozen layers sit under trainable adaptors / cross-attention (and, in the ViT, behind
  trainable stems), so gradients pass through them: 4N."""
  mode = config.model.freeze
  treatment = {}
  if mode in ("freeze_lang_vision", "freeze_vision"):
    treatment["vision_layers"] = F.FROZEN_PASSTHROUGH
  if mode in ("freeze_lang_vision", "freeze_lang"):
    treatment["decoder_layers"] = F.FROZEN_PASSTHROUGH
  return treatment
