r"""CogAgent: low-res tokens in a Vicuna LM + high-res cross-module (arXiv 2312.08914).

    vlm-train --config configs/cogagent.py:tiny --workdir /tmp/cogagent_tiny
    vlm-info  --config configs/cogagent.py:18b --no-shardings
    vlm-info  --config configs/cogagent.py:18b,cross_module=False,image=490,stage=0 --no-shardings
    python bench/train_step.py configs/cogagent.py:bench
    python bench/cogagent_flops.py          # the FLOPs table of docs/models.md

`arg` = size name, then optional comma-separated `key=value` options: `stage` (0: train
everything but the low-res ViT; 1: the paper's first pre-training phase, only the
high-res cross-module (high-res ViT + cross-attention) trains; 2: + the visual expert),
`visual_expert` (bool), `cross_module` (bool; False = the low-res-only model),
`image` / `high_res` (pixels of the low- / high-res input), `text` (text tokens after the
image slots), `scan` (bool), `remat` (none|full|dots), `dtype` (float32|bfloat16),
`packed` (bool: config.data.packing with rows of PACKED[size] unpacked lengths and as
many image slots, data/packing.py), `towers` (release: the released towers' layouts, which
`vlm-convert import --layout cogagent` fills: EVA2-CLIP-E normalising each branch's output,
EVA-02 with 2-D rotary, SwiGLU + sub-LayerNorms and q/v-only biases, no final norms, output
position embeddings (models/cogagent.py, nn/eva.py); vit: plain pre-LN ViTs with GELU).
18b defaults to release; tiny and bench to vit, the layout their recorded figures
(docs/performance.md) and fixtures were measured with; both layouts train from scratch.

Sizes — LM width / layers / heads / MLP / vocab; low-res ViT width / layers / heads / MLP,
adapter hidden, image px; high-res ViT width / layers / heads / MLP, image px; cross-attn
width / heads; text tokens after the (image/14)^2 + 2 image slots:

    tiny   128 /  2 /  4 /   344 / data (1024);   64 /  2 /  4 /   256,   344,  56;
            64 /  2 /  4 /  256, 112;   32 /  4;  T = 18 + 80
    bench 1024 /  4 / 16 /  2816 / data (1024);  768 /  4 / 12 /  3072,  2816, 224;
           384 /  4 /  6 / 1536, 336;  256 /  8;  T = 258 + 64
    18b   4096 / 32 / 32 / 11008 / 32000;       1792 / 63 / 16 / 15360, 11008, 224;
          1024 / 23 / 16 / 2730, 1120; 1024 / 32;  T = 258 + 256
          (Vicuna-7B; EVA2-CLIP-E less its last layer; EVA-02-L, whose 24th block the
          release stores but never runs; visual expert on)

Param counts (jax.eval_shape; docs/models.md has the table and the command): 18b =
18.28B: visual 11.54B (low-res ViT 4.28B, adapter 0.14B, high-res ViT 0.30B,
cross-attention 0.34B, visual expert 6.48B) + language 6.74B (Vicuna-7B) — the paper says
11B visual + 7B language. tiny = 1.50M, bench = 153.7M.

Training: the low-res ViT is always frozen (stop-gradient). tiny/bench default to stage 0
(nothing here is pretrained); 18b to stage 1, as the paper's pre-training starts (it later
unfreezes the visual expert: stage 2). Batch/steps/lr per size are in TRAINING.
"""
import ml_collections

from vlm_jax import config as config_lib
from vlm_jax.models import cogagent as model_lib
from vlm_jax.nn import vit

DATA_VOCAB_SIZE = 1024  # the shipped SentencePiece model (vlm_jax/data/tokenizer)
PATCH_SIZE = 14
TOWERS = {"vit": (dict(mlp_activation="gelu", class_token=True),) * 2,
          "release": (model_lib.EVA2_CLIP_LAYOUT, model_lib.EVA02_LAYOUT)}
# name: sub-configs of the parts, low- and high-res image px, text tokens after the
# (image/14)^2 + 2 image slots.
SIZES = {
    "tiny": dict(
        lm=dict(width=128, num_layers=2, num_heads=4, mlp_dim=344, vocab_size=DATA_VOCAB_SIZE),
        vision=dict(width=64, depth=2, num_heads=4, mlp_dim=256, patch_size=PATCH_SIZE),
        adapter=dict(mlp_dim=344),
        high_res=dict(width=64, depth=2, num_heads=4, mlp_dim=256, patch_size=PATCH_SIZE),
        cross=dict(width=32, heads=4), image=56, high_res_image=112, text=80),
    "bench": dict(
        lm=dict(width=1024, num_layers=4, num_heads=16, mlp_dim=2816,
                vocab_size=DATA_VOCAB_SIZE),
        vision=vit.variant(f"B/{PATCH_SIZE}", depth=4), adapter=dict(mlp_dim=2816),
        high_res=dict(width=384, depth=4, num_heads=6, mlp_dim=1536, patch_size=PATCH_SIZE),
        cross=dict(width=256, heads=8), image=224, high_res_image=336, text=64),
    # Vicuna-7B; EVA2-CLIP-E without its last layer; EVA-02-L as cross_visual.py runs it
    # (23 of its 24 blocks; SwiGLU hidden int(1024 * 2.6667)).
    "18b": dict(
        lm=dict(width=4096, num_layers=32, num_heads=32, mlp_dim=11008, vocab_size=32000),
        vision=vit.variant(f"E/{PATCH_SIZE}", depth=63), adapter=dict(mlp_dim=11008),
        high_res=vit.variant(f"L/{PATCH_SIZE}", depth=23, mlp_dim=2730),
        cross=dict(width=1024, heads=32), image=224, high_res_image=1120, text=256),
}
# size: (batch_size, steps, peak lr, warmup, default stage)
TRAINING = {
    "tiny": (16, 150, 2e-3, 15, 0),
    "bench": (2, 50, 1e-4, 5, 0),  # batch 2: a CPU step stays ~10 s
    "18b": (4608, 60_000, 2e-5, 500, 1),  # paper: batch 4608, lr 2e-5 (from memory)
}
# size: (row length in unpacked lengths T, image slots per row) with packed=True. An example
# is its image slots plus a short text (sample data: tiny 18 + ~48 of T = 98, 67% real
# tokens unpacked; bench 258 + ~48 of 322, 95%; 18b 258 + ~48 of 514, 60%), so rows of 4T /
# 2T / 3T hold at most 6 / 2 / 5 examples: 95% / 95% / 99% real tokens (docs/performance.md).
PACKED = {"tiny": (4, 6), "bench": (2, 2), "18b": (3, 5)}
DEFAULT_TOWERS = {"tiny": "vit", "bench": "vit", "18b": "release"}
OPTIONS = {"stage": int, "visual_expert": bool, "cross_module": bool, "image": int,
           "high_res": int, "text": int, "packed": bool, "towers": str}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  size, options = config_lib.parse_arg(arg, SIZES, OPTIONS, "cogagent")
  sizes = SIZES[size]
  batch, steps, lr, warmup, stage = TRAINING[size]
  stage = options.get("stage", stage)
  cross_module = options.get("cross_module", True)
  visual_expert = options.get("visual_expert", True)
  if stage and not cross_module:
    raise ValueError(f"cogagent stage={stage} trains the cross-module; with "
                     "cross_module=False use stage=0.")
  if stage == 2 and not visual_expert:
    raise ValueError("cogagent stage=2 trains the visual expert; it needs visual_expert=True.")
  towers = options.get("towers", DEFAULT_TOWERS[size])
  if towers not in TOWERS:
    raise ValueError(f"cogagent towers={towers!r}: expected one of {sorted(TOWERS)}.")
  low_layout, high_layout = TOWERS[towers]
  image = options.get("image", sizes["image"])
  high_res = options.get("high_res", sizes["high_res_image"])
  for name, pixels in (("image", image), ("high_res", high_res)):
    if pixels % PATCH_SIZE:
      raise ValueError(f"cogagent {name}={pixels} is not a multiple of the patch size "
                       f"{PATCH_SIZE}.")

  c = config_lib.base_config("cogagent", options)
  c.batch_size = batch
  c.num_train_steps = steps
  c.optimizer.learning_rate = lr
  c.optimizer.warmup_steps = warmup
  c.optimizer.weight_decay = 0.05
  c.frozen = model_lib.frozen_patterns(stage)

  m = c.model
  m.lm = sizes["lm"]
  m.vision = dict(sizes["vision"], **low_layout)
  m.adapter = sizes["adapter"]
  m.high_res = dict(sizes["high_res"], **high_layout)
  m.cross = sizes["cross"]
  m.visual_expert = visual_expert
  m.cross_module = cross_module

  c.data.mixture = "cogagent_pretrain"
  c.data.image_size = image
  c.data.high_res_image_size = high_res
  c.data.image_tokens = model_lib.image_tokens(image, PATCH_SIZE)  # + boi, eoi
  c.data.sequence_length = c.data.image_tokens + options.get("text", sizes["text"])
  if options.get("packed", False):
    rows, c.data.packed_images = PACKED[size]
    c.data.packing = True
    c.data.sequence_length *= rows
  return c
