"""Analytic FLOPs of the building blocks in nn/, for the families' `flops_parts` (models/).

A multiply-add counts 2 FLOPs. Counted: every matmul and convolution (weights), plus the
attention score (QK^T) and value (PV) products. Not counted: norms, activations, softmax,
pooling, embedding gathers (element-wise work; see docs/models.md for how much XLA's
`cost_analysis()` adds on top). Training multiplies a part's forward FLOPs by its rule
(DESIGN.md): 3x (6N) trainable, 2x (4N) frozen with gradients passing through, 1x (2N)
frozen behind a stop-gradient.
"""
import math

TRAINABLE, FROZEN_PASSTHROUGH, FROZEN_STOPGRAD = "trainable", "frozen_passthrough", "stopgrad"
TRAIN_MULTIPLIER = {TRAINABLE: 3.0, FROZEN_PASSTHROUGH: 2.0, FROZEN_STOPGRAD: 1.0}


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


def vit(image_size, patch_size, width, layers, heads, mlp_dim, class_token=True,
        mlp_activation="gelu"):
  """vlm_jax.nn.vit.ViT on one square image."""
  patches = (image_size // patch_size) ** 2
  tokens = patches + int(class_token)
  layer = (attention(tokens, tokens, width, heads, width // heads)
           + mlp(tokens, width, mlp_dim, mlp_activation))
  return dense(patches, patch_size ** 2 * 3, width) + layers * layer


def resize(in_size, out_size, channels):
  """A bilinear resize of a square map (expert_stem.resize_align_corners): one einsum with a
  weight matrix per spatial axis."""
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


def decoder_lm_layer(tokens, lm, causal_half=True):
  """One layer of `nn.decoder_lm.DecoderLM` as configured by the sub-config `lm` (its
  fields; DecoderLM's defaults where absent)."""
  width, heads = lm["width"], lm["num_heads"]
  head_dim = lm.get("head_dim") or width // heads
  return (attention(tokens, tokens, width, heads, head_dim, lm.get("num_kv_heads") or heads,
                    causal_half=causal_half)
          + mlp(tokens, width, lm["mlp_dim"], lm.get("mlp_activation", "swiglu")))
