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


FAMILIES = {"simvlm": simvlm_parts, "minigpt_v2": minigpt_v2_parts}


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
  parts = forward_parts(model_config, data_config, causal_half)
  return {"forward": sum(parts.values()), "train": train_flops(parts, treatment),
          "parts": parts}
