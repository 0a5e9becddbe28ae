r"""SimVLM: encoder-decoder PrefixLM over [image ; text prefix] (arXiv 2108.10904).

    vlm-train --config configs/simvlm.py:tiny --workdir /tmp/simvlm_tiny
    vlm-train --config configs/simvlm.py:tiny,scan=False,remat=full --workdir /tmp/t
    vlm-info  --config configs/simvlm.py:base
    vlm-train --config configs/simvlm.py:tiny,t5=True --workdir /tmp/t \
        --config.init.lm=/ckpt/t5-v1_1  # a T5 v1.1 of the same sizes (docs/weights.md)

`arg` = size name, then optional comma-separated `key=value` options:
`scan` (bool, scan the layer stacks), `remat` (none|full|dots), `dtype` (float32|bfloat16),
`t5` (bool: the text path in T5 v1.1's layout, `T5_TEXT`, so a T5 checkpoint can
warm-start it through --config.init.lm), `packed` (bool: config.data.packing, rows of
1.5 Lp prefix and 3 Ls decoder tokens with 8 image slots and 32 packing bins,
data/packing_encoder_decoder.py; 90-92% real tokens on pretrain_simvlm, docs/performance.md).

Sizes (width / heads / MLP / encoder layers / decoder layers / conv stem width, blocks /
image px / vocab):

    tiny   128 /  4 /  512 /  2 /  2 / 16, (1,1,1) /  64 / data vocab (1024)
    bench 1024 / 16 / 4096 /  4 /  4 / 16, (1,1,1) /  64 / data vocab (1024)
    base   768 / 12 / 3072 / 12 / 12 / 64, (3,4,6) / 224 / 32000
    large 1024 / 16 / 4096 / 24 / 24 / 64, (3,4,6) / 224 / 32000
    huge  1280 / 16 / 5120 / 32 / 32 / 64, (3,4,6) / 224 / 32000

Base/Large/Huge widths, heads and MLP sizes are ViT-B/L/H's, as the paper states. Depths: we
use the ViT depths (12/24/32) for both the encoder and the decoder; we could not confirm the
paper's exact decoder depths from a primary source here (see docs/models.md). The conv stem
is the first three stages of ResNet-50 (root 7x7/2 + pool, blocks 3/4/6, widths
256/512/1024), i.e. the ViT-hybrid R50 stem, stride 16 -> 14x14 tokens at 224 px.
"""
import ml_collections

from vlm_jax import config as config_lib

DATA_VOCAB_SIZE = 1024  # our shipped SentencePiece model (vlm_jax/data/tokenizer); tiny, bench
R50_STEM = dict(width=64, stage_blocks=(3, 4, 6))  # ResNet-50's first three stages


def text(width, num_heads, mlp_dim, layers, vocab_size=DATA_VOCAB_SIZE):
  """The text encoder-decoder, `layers` deep on each side (models.simvlm.TextConfig)."""
  return dict(vocab_size=vocab_size, width=width, num_heads=num_heads, mlp_dim=mlp_dim,
              encoder_layers=layers, decoder_layers=layers)


# name: sub-configs of the parts and the image px.
SIZES = {
    "tiny": dict(lm=text(128, 4, 512, 2), vision=dict(width=16, stage_blocks=(1, 1, 1)),
                 image=64),
    "bench": dict(lm=text(1024, 16, 4096, 4), vision=dict(width=16, stage_blocks=(1, 1, 1)),
                  image=64),
    "base": dict(lm=text(768, 12, 3072, 12, 32000), vision=R50_STEM, image=224),
    "large": dict(lm=text(1024, 16, 4096, 24, 32000), vision=R50_STEM, image=224),
    "huge": dict(lm=text(1280, 16, 5120, 32, 32000), vision=R50_STEM, image=224),
}
# Per size: (batch_size, steps, lr, warmup, prefix_length, suffix_length).
TRAINING = {
    "tiny": (32, 1000, 1e-3, 100, 16, 24),
    "bench": (16, 100, 3e-4, 10, 32, 32),
    "base": (4096, 1_000_000, 5e-4, 10_000, 64, 64),
    "large": (4096, 1_000_000, 5e-4, 10_000, 64, 64),
    "huge": (4096, 1_000_000, 5e-4, 10_000, 64, 64),
}
OPTIONS = {"t5": bool, "packed": bool}
# T5 v1.1's text layout (relative position bias, RMSNorm, gated GELU, no biases, untied head).
T5_TEXT = dict(position="relative", norm_type="rmsnorm", mlp_activation="geglu",
               use_bias=False, tie_embeddings=False)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  size, options = config_lib.parse_arg(arg, SIZES, OPTIONS, "simvlm")
  sizes = SIZES[size]
  batch, steps, lr, warmup, prefix_len, suffix_len = TRAINING[size]

  c = config_lib.base_config("simvlm", options)
  c.batch_size = batch
  c.num_train_steps = steps
  c.optimizer.learning_rate = lr
  c.optimizer.warmup_steps = warmup
  c.frozen = ()  # SimVLM trains everything from scratch

  m = c.model
  m.lm = dict(sizes["lm"], mlp_activation="gelu", max_text_length=max(prefix_len, suffix_len),
              tie_embeddings=True, position="learned", norm_type="layernorm", use_bias=True)
  if options.get("t5"):
    m.lm.update(T5_TEXT)
  m.vision = sizes["vision"]
  m.dropout_rate = 0.0  # paper: 0.1 when fine-tuning
  m.drop_path_rate = 0.0  # paper: 0.1 on conv stage + encoder when fine-tuning

  c.data.mixture = "pretrain_simvlm"
  c.data.image_size = sizes["image"]
  c.data.prefix_length = prefix_len  # Lp, encoder text slots
  c.data.suffix_length = suffix_len  # Ls, decoder slots including EOS
  # Image-text pairs: probability of an empty text prefix (pure captioning); otherwise the
  # prefix length is uniform in [1, min(n - 1, Lp)]. Text documents always have p >= 1.
  c.data.pair_zero_prefix_prob = 0.5
  # Packed rows (config.data.packing): an example has ~0.8 images and prefixes average ~1/7
  # and suffixes ~1/4 of their slots (bench), so rows of 1.5 Lp prefix and 3 Ls decoder tokens
  # with 8 image slots fill all three about evenly (docs/performance.md "Sequence packing").
  c.data.packed_prefix_length = 3 * prefix_len // 2
  c.data.packed_suffix_length = 3 * suffix_len
  if options.get("packed", False):
    c.data.packing = True
    c.data.packed_images = 8
    c.data.packing_bins = 32
  return c
