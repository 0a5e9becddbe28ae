r"""Prismer: frozen experts' outputs as input modalities, Experts Resampler, adaptors in a
frozen ViT and a frozen RoBERTa decoder (arXiv 2303.02506).

    vlm-train --config configs/prismer.py:tiny --workdir /tmp/prismer_tiny
    vlm-train --config configs/prismer.py:tiny,experts=none --workdir /tmp/prismerz   # PrismerZ
    vlm-train --config configs/prismer.py:tiny,freeze=freeze_vision --workdir /tmp/t   # fine-tune
    vlm-data experts --input 'shards/*.tar' --output /data/labelled --experts edge,depth \
        --labels /data/expert_labels                                                  # labelling
    vlm-info  --config configs/prismer.py:base
    python bench/train_step.py configs/prismer.py:bench

`arg` = size name, then optional comma-separated `key=value` options: `experts` (names joined
by '+', e.g. depth+seg, or 'none' for PrismerZ; default per size), `freeze`
(freeze_lang_vision = pretraining, the default | freeze_vision = fine-tuning | freeze_lang |
none), `stem_norm` (the expert stems' norm: layer, the default | batch = BatchNorm with frozen
running statistics, as in Prismer's released checkpoints, nn/expert_stem.py), `scan` (bool),
`remat` (none|full|dots), `dtype` (float32|bfloat16), `packed` (bool: config.data.packing
with rows of PACKED[size] text lengths and as many image slots as examples fit,
data/families/prismer.py).

Sizes — ViT width / layers / heads / MLP / patch; decoder width / layers / heads / MLP /
vocab; image px; expert map px; text length; latents / resampler layers / heads:

    tiny    64 /  2 /  4 /  256 /  8;   64 /  2 /  4 /  256 / data (1024);  64;  64; 24;
            16 / 2 / 4; experts depth + seg + obj_detection
    bench  768 /  4 / 12 / 3072 / 16;  768 /  4 / 12 / 3072 / data (1024); 224; 224; 32;
            64 / 4 / 8; experts depth + seg + obj_detection
    base   768 / 12 / 12 / 3072 / 16;  768 / 12 / 12 / 3072 / 50265;      224; 224; 30;
            64 / 4 / 8; all six experts        (ViT-B/16 + RoBERTa-base)
    large 1024 / 24 / 16 / 4096 / 14; 1024 / 24 / 16 / 4096 / 50265;      224; 224; 30;
            64 / 4 / 8; all six experts        (ViT-L/14 + RoBERTa-large)

Trainable parameters (freeze_lang_vision, jax.eval_shape; docs/models.md has the table and
the command): base 157.4M of 327.5M, large 362.5M of 967.1M (paper: about 160M / 360M).
"""
import ml_collections

from vlm_jax import config as config_lib
from vlm_jax.models import prismer as model_lib
from vlm_jax.nn import expert_vit

DATA_VOCAB_SIZE = 1024  # the shipped SentencePiece model (vlm_jax/data/tokenizer); tiny, bench
ALL_EXPERTS = expert_vit.EXPERTS
DEMO_EXPERTS = ("depth", "seg", "obj_detection")
RESAMPLER = dict(num_latents=64, resampler_layers=4, resampler_heads=8)


def roberta(width, num_layers, num_heads, mlp_dim, vocab_size=DATA_VOCAB_SIZE):
  return dict(width=width, num_layers=num_layers, num_heads=num_heads, mlp_dim=mlp_dim,
              vocab_size=vocab_size)


def vit(width, depth, num_heads, mlp_dim, patch_size, experts, **resampler):
  return dict(width=width, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim,
              patch_size=patch_size, experts=experts, **(resampler or RESAMPLER))


# name: sub-configs of the parts; image and expert-map px; text length.
SIZES = {
    "tiny": dict(lm=roberta(64, 2, 4, 256),
                 vision=vit(64, 2, 4, 256, 8, DEMO_EXPERTS, num_latents=16, resampler_layers=2,
                            resampler_heads=4),
                 image=64, expert_px=64, text=24),
    "bench": dict(lm=roberta(768, 4, 12, 3072), vision=vit(768, 4, 12, 3072, 16, DEMO_EXPERTS),
                  image=224, expert_px=224, text=32),
    # ViT-B/16 + RoBERTa-base; ViT-L/14 + RoBERTa-large.
    "base": dict(lm=roberta(768, 12, 12, 3072, 50265),
                 vision=vit(768, 12, 12, 3072, 16, ALL_EXPERTS),
                 image=224, expert_px=224, text=30),
    "large": dict(lm=roberta(1024, 24, 16, 4096, 50265),
                  vision=vit(1024, 24, 16, 4096, 14, ALL_EXPERTS),
                  image=224, expert_px=224, text=30),
}
# Per size: (batch_size, steps, peak lr, warmup). Paper pretraining: batch 1024, lr 3e-4
# (1e-4 for large), weight decay 0.05, 2000 warmup steps, 20 epochs.
TRAINING = {
    "tiny": (16, 150, 2e-3, 15),
    "bench": (2, 50, 3e-4, 5),
    "base": (1024, 200_000, 3e-4, 2000),
    "large": (1024, 200_000, 1e-4, 2000),
}
# size: (row length in text lengths T, image slots per row) with packed=True.
PACKED = {"tiny": (2, 8), "bench": (2, 8), "base": (2, 8), "large": (2, 8)}
OPTIONS = {"experts": str, "freeze": str, "stem_norm": str, "packed": bool}


def _experts(text: str) -> tuple[str, ...]:
  if text == "none":
    return ()
  experts = tuple(filter(None, text.split("+")))
  unknown = [e for e in experts if e not in ALL_EXPERTS]
  if unknown:
    raise ValueError(f"config option experts={text!r}: unknown {unknown}; expected names from "
                     f"{ALL_EXPERTS} joined by '+', or 'none'.")
  return experts


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  size, options = config_lib.parse_arg(arg, SIZES, OPTIONS, "prismer")
  sizes = SIZES[size]
  experts = sizes["vision"]["experts"]
  if "experts" in options:
    experts = _experts(options["experts"])
  freeze = options.get("freeze", "freeze_lang_vision")
  batch, steps, lr, warmup = TRAINING[size]

  c = config_lib.base_config("prismer", options)
  c.batch_size = batch
  c.num_train_steps = steps
  c.log_every_steps = 25
  c.optimizer.learning_rate = lr
  c.optimizer.warmup_steps = warmup
  c.optimizer.weight_decay = 0.05
  c.frozen = model_lib.frozen_patterns(freeze)

  m = c.model
  m.lm = dict(sizes["lm"], max_text_length=514)
  m.vision = dict(sizes["vision"], experts=experts, image_size=sizes["image"],
                  num_instance_embeddings=128,
                  expert_stem_norm=options.get("stem_norm", "layer"))
  m.adaptor_ratio = 1
  m.freeze = freeze
  m.dropout_rate = 0.0

  c.data.mixture = "prismer_scenes"
  c.data.image_size = sizes["image"]
  c.data.resize_mode = "stretch"  # expert maps are pixel-aligned with the whole image
  c.data.text_length = sizes["text"]
  c.data.experts = experts
  c.data.expert_size = sizes["expert_px"]  # expert maps are resized to this (reference: 224)
  c.data.label_dim = 64  # per-pixel label embedding size (reference: PCA-reduced CLIP, 64)
  c.data.label_table = ""  # "" = deterministic default vectors; else a .npz/.json table
  if options.get("packed", False):
    rows, c.data.packed_images = PACKED[size]
    c.data.packing = True
    c.data.sequence_length = rows * sizes["text"]  # a packed row's tokens (data/packing.py)
  return c
