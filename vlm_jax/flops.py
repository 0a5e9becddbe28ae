"""Analytic model FLOPs per example, split by parameter sub-tree, for MFU and sanity checks.

A multiply-add counts 2 FLOPs. Counted: every matmul and convolution (weights), plus the
attention score (QK^T) and value (PV) products. Not counted: norms, activations, softmax,
pooling, embedding gathers (element-wise work; see docs/models.md for how much XLA's
`cost_analysis()` adds on top).

`forward_parts(config.model, config.data)` gives forward FLOPs per named part (a top-level
param sub-tree, e.g. 'image_embedder', 'encoder', 'decoder', 'logits'). Training cost applies
DESIGN.md's rules per part: 3x forward (6N) for trainable weights, 2x (4N) for frozen weights
that gradients flow through, 1x (2N) for frozen weights behind a stop-gradient.
"""
import math
import re

TRAINABLE, FROZEN_PASSTHROUGH, FROZEN_STOPGRAD = "trainable", "frozen_passthrough", "stopgrad"
TRAIN_MULTIPLIER = {TRAINABLE: 3.0, FROZEN_PASSTHROUGH: 2.0, FROZEN_STOPGRAD: 1.0}


# ----------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------
def dense(tokens, fan_in, fan_out):
  return 2.0 * tokens * fan_in * fan_out


def attention(q_len, kv_len, width, num_heads, head_dim, num_kv_heads=None, causal_half=False):
  """Projections + scores + values for one attention block (self when q_len == kv_len)."""
  kv_heads = num_kv_heads or num_heads
  proj = (dense(q_len, width, num_heads * head_dim) + dense(kv_len, width, 2 * kv_heads * head_dim)
          + dense(q_len, num_heads * head_dim, width))
  scores_values = 2 * 2.0 * q_len * kv_len * num_heads * head_dim
  return proj + scores_values * (0.5 if causal_half else 1.0)


def mlp(tokens, width, hidden, activation="gelu"):
  return dense(tokens, width, hidden) * (3 if activation in ("swiglu", "geglu") else 2)


def conv(out_hw, kernel, c_in, c_out):
  return 2.0 * out_hw[0] * out_hw[1] * kernel * kernel * c_in * c_out


def conv_stem(image_size, width, stage_blocks, out_features):
  """FLOPs and the output grid of vlm_jax.nn.conv_stem.ConvStem ('SAME' padding)."""
  hw = math.ceil(image_size / 2)
  total = conv((hw, hw), 7, 3, width)
  hw = math.ceil(hw / 2)  # max-pool
  c_in = width
  for stage, num_blocks in enumerate(stage_blocks):
    mid, out = width * 2 ** stage, 4 * width * 2 ** stage
    for block in range(num_blocks):
      in_hw = hw
      if stage > 0 and block == 0:
        hw = math.ceil(hw / 2)
      if c_in != out or hw != in_hw:
        total += conv((hw, hw), 1, c_in, out)
      total += conv((in_hw, in_hw), 1, c_in, mid) + conv((hw, hw), 3, mid, mid)
      total += conv((hw, hw), 1, mid, out)
      c_in = out
  total += dense(hw * hw, c_in, out_features)
  return total, hw


# ----------------------------------------------------------------------------------------
# Families
# ----------------------------------------------------------------------------------------
def simvlm_parts(model, data, causal_half=True):
  width, heads = model.width, model.num_heads
  head_dim = model.get("head_dim") or width // heads
  act = model.get("mlp_activation", "gelu")
  stem, grid = conv_stem(data.image_size, model.stem_width, model.stem_blocks, width)
  enc_len = grid * grid + data.prefix_length
  dec_len = data.suffix_length
  enc_layer = attention(enc_len, enc_len, width, heads, head_dim) + mlp(enc_len, width,
                                                                         model.mlp_dim, act)
  dec_layer = (attention(dec_len, dec_len, width, heads, head_dim, causal_half=causal_half)
               + attention(dec_len, enc_len, width, heads, head_dim)
               + mlp(dec_len, width, model.mlp_dim, act))
  return {
      "image_embedder": stem,
      "encoder": model.encoder_layers * enc_layer,
      "decoder": model.decoder_layers * dec_layer,
      "logits": dense(dec_len, width, model.vocab_size),
  }


def minigpt_v2_parts(model, data, causal_half=True):
  patches = (data.image_size // model.patch_size) ** 2
  vit_len, vw = patches + 1, model.vision_width
  vit_layer = (attention(vit_len, vit_len, vw, model.vision_heads, vw // model.vision_heads)
               + mlp(vit_len, vw, model.vision_mlp_dim, "gelu"))
  t, width, heads = data.sequence_length, model.width, model.num_heads
  head_dim, kv_heads = width // heads, model.get("num_kv_heads") or heads
  lm_layer = (attention(t, t, width, heads, head_dim, kv_heads, causal_half=causal_half)
              + mlp(t, width, model.mlp_dim, "swiglu"))
  lora_layer = sum(dense(t, width, model.lora_rank)
                   + dense(t, model.lora_rank, (heads if n == "query" else kv_heads) * head_dim)
                   for n in model.lora_targets)
  return {"vision": dense(patches, model.patch_size ** 2 * 3, vw) + model.vision_layers * vit_layer,
          "projection": dense(patches // model.group_size, model.group_size * vw, width),
          "lm": model.num_layers * lm_layer, "lora": model.num_layers * lora_layer,
          "logits": dense(t, width, model.vocab_size)}


def vit(image_size, patch_size, width, layers, heads, mlp_dim, class_token=True):
  """vlm_jax.nn.vit.ViT (GELU MLP) on one square image."""
  patches = (image_size // patch_size) ** 2
  tokens = patches + int(class_token)
  layer = attention(tokens, tokens, width, heads, width // heads) + mlp(tokens, width, mlp_dim)
  return dense(patches, patch_size ** 2 * 3, width) + layers * layer


def cogagent_parts(model, data, causal_half=True):
  """'lm' counts each token through one weight set (the model FLOPs of a routed visual
  expert); 'visual_expert' is the second set that fixed shapes also apply to every token."""
  patches = (data.image_size // model.patch_size) ** 2
  t, width, heads = data.sequence_length, model.width, model.num_heads
  head_dim, kv_heads = width // heads, model.get("num_kv_heads") or heads
  lm_layer = (attention(t, t, width, heads, head_dim, kv_heads, causal_half=causal_half)
              + mlp(t, width, model.mlp_dim, "swiglu"))
  parts = {
      "vision": vit(data.image_size, model.patch_size, model.vision_width, model.vision_layers,
                    model.vision_heads, model.vision_mlp_dim),
      "adapter": dense(patches, model.vision_width, width)
                 + mlp(patches, width, model.adapter_mlp_dim, "swiglu"),
      "lm": model.num_layers * lm_layer,
      "logits": dense(t, width, model.vocab_size),
  }
  if model.visual_expert:
    projections = (dense(t, width, heads * head_dim) + dense(t, width, 2 * kv_heads * head_dim)
                   + dense(t, heads * head_dim, width))
    parts["visual_expert"] = model.num_layers * (projections
                                                 + mlp(t, width, model.mlp_dim, "swiglu"))
  if model.cross_module:
    keys = (data.high_res_image_size // model.high_res_patch_size) ** 2
    cw = model.cross_width
    parts["high_res"] = vit(data.high_res_image_size, model.high_res_patch_size,
                            model.high_res_width, model.high_res_layers, model.high_res_heads,
                            model.high_res_mlp_dim)
    parts["cross_attention"] = model.num_layers * (
        dense(t, width, cw) + dense(keys, model.high_res_width, 2 * cw) + dense(t, cw, width)
        + 2 * 2.0 * t * keys * cw)
  return parts


def flamingo_parts(model, data, causal_half=True):
  """Per example: N media items of F frames (F = 1 for images), T text tokens."""
  frames = max(data.get("frames_per_media", 0), 1)
  media, t = data.max_images, data.sequence_length
  patches = (data.image_size // model.patch_size) ** 2
  vit_len, vw = patches + 1, model.vision_width  # + class token
  vit_layer = (attention(vit_len, vit_len, vw, model.vision_heads, vw // model.vision_heads)
               + mlp(vit_len, vw, model.vision_mlp_dim, "gelu"))
  vision = dense(patches, model.patch_size ** 2 * 3, vw) + model.vision_layers * vit_layer
  latents, inputs = model.num_latents, frames * patches
  r_inner = model.resampler_heads * model.resampler_head_dim
  resampler_layer = (dense(latents, vw, r_inner) + dense(inputs + latents, vw, 2 * r_inner)
                     + dense(latents, r_inner, vw) + 4.0 * latents * (inputs + latents) * r_inner
                     + mlp(latents, vw, model.resampler_mlp_ratio * vw))
  width, heads = model.width, model.num_heads
  head_dim = model.get("head_dim") or width // heads
  kv_heads = model.get("num_kv_heads") or heads
  act = model.get("mlp_activation", "swiglu")
  lm_layer = (attention(t, t, width, heads, head_dim, kv_heads, causal_half=causal_half)
              + mlp(t, width, model.mlp_dim, act))
  visual_tokens, x_inner = media * latents, model.xattn_heads * model.xattn_head_dim
  # Every query scores every visual token (the mask only hides some), so no halving.
  xattn_block = (dense(t, width, x_inner) + dense(visual_tokens, vw, 2 * x_inner)
                 + dense(t, x_inner, width) + 4.0 * t * visual_tokens * x_inner
                 + mlp(t, width, model.xattn_mlp_ratio * width))
  blocks = model.num_layers // model.xattn_group * len(model.xattn_sublayers)
  return {"vision": media * frames * vision,
          "resampler": media * model.resampler_layers * resampler_layer,
          "xattn": blocks * xattn_block, "lm": model.num_layers * lm_layer,
          "logits": dense(t, width, model.vocab_size)}


def minigpt_v2_treatment(config) -> dict:
  """The ViT sits behind a stop-gradient (2N); the LM and its head pass gradients through to
  the projection and LoRA (4N) unless config.frozen leaves them trainable (freeze_lm=False)."""
  lm_frozen = any(re.fullmatch(p, "lm/logits_projection/kernel") for p in config.frozen)
  lm = FROZEN_PASSTHROUGH if lm_frozen else TRAINABLE
  return {"vision": FROZEN_STOPGRAD, "lm": lm, "logits": lm}


def flamingo_treatment(config) -> dict:
  """Frozen ViT behind a stop-gradient; the frozen LM and head pass gradients down to the
  gated blocks; resampler and gated blocks train."""
  del config  # the LM is frozen in every Flamingo config
  return {"vision": FROZEN_STOPGRAD, "lm": FROZEN_PASSTHROUGH, "logits": FROZEN_PASSTHROUGH}


def cogagent_treatment(config) -> dict:
  """The low-resolution ViT is frozen behind a stop-gradient; everything else trains."""
  del config
  return {"vision": FROZEN_STOPGRAD}


def resize(in_size, out_size, channels):
  """jax.image.resize of a square map: one einsum with a weight matrix per spatial axis."""
  if in_size == out_size:
    return 0.0
  return 2.0 * channels * in_size * out_size * (in_size + out_size)


def expert_stem(grid, width, in_channels, strides, in_size):
  """FLOPs of vlm_jax.nn.expert_stem.ExpertStem: an `in_size` map to a `grid` patch grid
  (the bilinear resize counts: XLA runs it as matmuls)."""
  size = grid * math.prod(strides)
  total, c_in = resize(in_size, size, in_channels), in_channels
  for divisor, stride in zip((8, 4, 2, 1), strides):
    size = math.ceil(size / stride)
    total += conv((size, size), 3, c_in, width // divisor)
    c_in = width // divisor
  return total + conv((grid, grid), 1, width, width)


def prismer_parts(model, data, causal_half=True):
  """Parts by how training treats them (`prismer_treatment`): the frozen ViT and RoBERTa
  layers are separate from the adaptors, cross-attention and everything else trainable."""
  vw, p, experts = model.vision_width, model.patch_size, tuple(model.experts)
  grid, expert_grid = data.image_size // p, data.expert_size // p
  vheads = model.vision_heads
  stems = dense(grid * grid, p * p * 3, vw)
  latents = model.num_latents if experts else 0
  if experts:
    for name in experts:
      label = name in ("seg", "obj_detection", "ocr_detection")
      channels = data.label_dim if label else {"depth": 1, "normal": 3, "edge": 1}[name]
      stems += expert_stem(expert_grid, vw, channels, (2, 2, 1, 1) if label else (2, 2, 2, 2),
                           data.expert_size)
    keys = len(experts) * expert_grid ** 2 + latents
    rheads = model.resampler_heads
    stems += model.resampler_layers * (attention(latents, keys, vw, rheads, vw // rheads)
                                       + mlp(latents, vw, 4 * vw))
  n = grid * grid + latents
  vit_layer = attention(n, n, vw, vheads, vw // vheads) + mlp(n, vw, model.vision_mlp_dim)
  ratio = model.get("adaptor_ratio", 1)
  t, width, heads = data.text_length, model.width, model.num_heads
  self_layer = (attention(t, t, width, heads, width // heads, causal_half=causal_half)
                + mlp(t, width, model.mlp_dim))
  cross = (dense(t, width, width) + dense(n, vw, 2 * width) + dense(t, width, width)
           + 2 * 2.0 * t * n * width)
  return {
      "vision_stems": stems,
      "vision_layers": model.vision_layers * vit_layer,
      "vision_adaptors": model.vision_layers * 2 * dense(n, vw, vw // ratio),
      "decoder_layers": model.num_layers * self_layer,
      "decoder_cross": model.num_layers * (cross + 2 * dense(t, width, width // ratio)),
      "output_layer": self_layer,
      "logits": dense(t, width, width) + dense(t, width, model.vocab_size),
  }


def prismer_treatment(config):
  """Frozen layers sit under trainable adaptors / cross-attention (and, in the ViT, behind
  trainable stems), so gradients pass through them: 4N."""
  mode = config.model.get("freeze", "freeze_lang_vision")
  vision = mode in ("freeze_lang_vision", "freeze_vision")
  lang = mode in ("freeze_lang_vision", "freeze_lang")
  treatment = {}
  if vision:
    treatment["vision_layers"] = FROZEN_PASSTHROUGH
  if lang:
    treatment["decoder_layers"] = FROZEN_PASSTHROUGH
  return treatment


FAMILIES = {"simvlm": simvlm_parts, "minigpt_v2": minigpt_v2_parts,
            "cogagent": cogagent_parts, "flamingo": flamingo_parts, "prismer": prismer_parts}
# Families with frozen parts: config -> {part: rule}; parts not named are trainable.
TREATMENTS = {"minigpt_v2": minigpt_v2_treatment, "flamingo": flamingo_treatment,
              "cogagent": cogagent_treatment, "prismer": prismer_treatment}


def config_treatment(config) -> dict:
  """Part -> training rule for a full config (the family's TREATMENTS entry, else {})."""
  rule = TREATMENTS.get(config.model.name)
  return rule(config) if rule else {}


def forward_parts(model_config, data_config, causal_half=True) -> dict:
  """Forward FLOPs per example per part. causal_half: count causal self-attention scores at
  half (MFU convention); False matches what XLA computes (full masked matmuls)."""
  if model_config.name not in FAMILIES:
    raise ValueError(f"vlm_jax.flops has no count for config.model.name={model_config.name!r}; "
                     f"add one to FAMILIES (known: {sorted(FAMILIES)}).")
  return FAMILIES[model_config.name](model_config, data_config, causal_half)


def train_flops(parts: dict, treatment: dict | None = None) -> float:
  """Sum of forward FLOPs x 3/2/1 per part; `treatment` maps part -> TRAINABLE |
  FROZEN_PASSTHROUGH | FROZEN_STOPGRAD (missing parts are trainable)."""
  treatment = treatment or {}
  return sum(f * TRAIN_MULTIPLIER[treatment.get(name, TRAINABLE)] for name, f in parts.items())


def flops_per_example(model_config, data_config, treatment=None, causal_half=True) -> dict:
  """treatment: part -> rule, e.g. `config_treatment(config)`; None: every part trainable."""
  parts = forward_parts(model_config, data_config, causal_half)
  return {"forward": sum(parts.values()), "train": train_flops(parts, treatment),
          "parts": parts}
