r"""MiniGPT-v2: frozen EVA ViT + 4-token concat projection + LLaMA-2 with LoRA (2310.09478).

    vlm-train --config configs/minigpt_v2.py:tiny --workdir /tmp/minigpt_v2_tiny
    vlm-train --config configs/minigpt_v2.py:tiny,stage=2,init_from=/tmp/minigpt_v2_tiny \
        --workdir /tmp/minigpt_v2_tiny_s2
    vlm-train --config configs/minigpt_v2.py:tiny,stage=3 --workdir /tmp/minigpt_v2_tiny_s3 \
        --config.init_from=/tmp/minigpt_v2_tiny_s2   # the same option as an override
    vlm-train --config configs/minigpt_v2.py:tiny,freeze_lm=False --workdir /tmp/t  # no LLaMA
    vlm-info  --config configs/minigpt_v2.py:7b

`arg` = size name, then optional comma-separated `key=value` options: `stage` (1|2|3: data
mixture and schedule), `init_from` (the previous stage's workdir: its newest parameters
start this run, see vlm_jax/train/init_from.py), `freeze_lm`
(bool, default True as the paper; tiny/bench have no pretrained LM, so False lets a CPU run
learn more than LoRA can on a random frozen LM), `scan` (bool), `remat` (none|full|dots),
`dtype` (float32|bfloat16), `packed` (bool: config.data.packing with rows of 2T tokens,
data/packing.py).

Sizes — LM width / layers / heads / MLP / vocab; ViT width / layers / heads / MLP; image px
(patch 14) -> ViT tokens -> LM visual tokens; text length T; LoRA r / alpha / dropout:

    tiny   128 /  2 /  4 /   344 / data (1024);   96 /  2 /  4 /  384;  112 ->   64 ->  16;
           T 160; r 8 / 16 / 0.05
    bench 1024 /  4 / 16 /  2816 / data (1024);  768 /  4 / 12 / 3072;  224 ->  256 ->  64;
           T 256; r 64 / 16 / 0.05
    7b    4096 / 32 / 32 / 11008 / 32000;       1408 / 39 / 16 / 6144;  448 -> 1024 -> 256;
           T 512; r 64 / 16 / 0.05 on q, v   (LLaMA-2-7B; EVA ViT-g/14 without its last layer)

Param counts (jax.eval_shape; docs/models.md has the command): 7b = 7.78B in all
(ViT 0.99B, projection 23.1M, LLaMA-2 6.74B, LoRA 33.6M); trainable = projection + LoRA
(56.6M). tiny = 1.0M (57k trainable), bench = 86.7M (4.2M trainable).

Stage schedules for 7b follow the paper (steps / global batch / peak lr): 1: 400k / 96 /
1e-4, 2: 50k / 64 / 1e-5, 3: 35k / 24 / 1e-5. The paper's stage-1/2 data code was never
released; our synthetic stage mixtures are described in vlm_jax/data/minigpt_v2.py.
"""
import ml_collections

from vlm_jax import config as config_lib
from vlm_jax.data.families import minigpt_v2 as data_lib
from vlm_jax.nn import vit

DATA_VOCAB_SIZE = 1024  # the shipped SentencePiece model (vlm_jax/data/tokenizer)
PATCH_SIZE, GROUP_SIZE = 14, 4
# name: sub-configs of the parts (the LM without its LoRA fields), image px, text length T
# (visual slots included), LoRA rank.
SIZES = {
    "tiny": dict(lm=dict(width=128, num_layers=2, num_heads=4, mlp_dim=344,
                         vocab_size=DATA_VOCAB_SIZE),
                 vision=dict(width=96, depth=2, num_heads=4, mlp_dim=384, patch_size=PATCH_SIZE),
                 image=112, length=160, lora_rank=8),
    "bench": dict(lm=dict(width=1024, num_layers=4, num_heads=16, mlp_dim=2816,
                          vocab_size=DATA_VOCAB_SIZE),
                  vision=vit.variant(f"B/{PATCH_SIZE}", depth=4),
                  image=224, length=256, lora_rank=64),
    # LLaMA-2-7B; EVA ViT-g/14 without its last layer (as MiniGPT-v2).
    "7b": dict(lm=dict(width=4096, num_layers=32, num_heads=32, mlp_dim=11008,
                       vocab_size=32000),
               vision=vit.variant(f"g/{PATCH_SIZE}", depth=39),
               image=448, length=512, lora_rank=64),
}
# (size, stage): (batch_size, steps, peak lr, warmup)
TRAINING = {
    ("tiny", 1): (16, 200, 1e-3, 20), ("tiny", 2): (16, 150, 5e-4, 15),
    ("tiny", 3): (16, 150, 5e-4, 15),
    ("bench", 1): (8, 50, 1e-4, 5), ("bench", 2): (8, 50, 1e-5, 5),
    ("bench", 3): (8, 50, 1e-5, 5),
    ("7b", 1): (96, 400_000, 1e-4, 1000), ("7b", 2): (64, 50_000, 1e-5, 1000),
    ("7b", 3): (24, 35_000, 1e-5, 1000),
}
OPTIONS = {"stage": int, "init_from": str, "freeze_lm": bool, "packed": bool}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  size, options = config_lib.parse_arg(arg, SIZES, OPTIONS, "minigpt_v2")
  stage = options.get("stage", 1)
  if stage not in data_lib.STAGE_MIXTURES:
    raise ValueError(f"minigpt_v2 stage={stage}: expected 1, 2 or 3.")
  sizes = SIZES[size]
  batch, steps, lr, warmup = TRAINING[(size, stage)]

  c = config_lib.base_config("minigpt_v2", options)
  c.batch_size = batch
  c.num_train_steps = steps
  c.optimizer.learning_rate = lr
  c.optimizer.warmup_steps = warmup
  c.optimizer.weight_decay = 0.05
  # The previous stage's workdir (same as --config.init_from=DIR; "" = the initialiser).
  c.init_from = options.get("init_from", "")
  lm_frozen = (r"lm/(?!.*/lora_[ab]$).*",) if options.get("freeze_lm", True) else ()
  c.frozen = (r"vision/.*",) + lm_frozen

  m = c.model
  m.lm = dict(sizes["lm"], lora_targets=("query", "value"), lora_rank=sizes["lora_rank"],
              lora_alpha=16.0, lora_dropout_rate=0.05)
  m.vision = dict(sizes["vision"], class_token=True, mlp_activation="gelu")
  m.group_size = GROUP_SIZE

  c.data.mixture = data_lib.STAGE_MIXTURES[stage]
  c.data.image_size = sizes["image"]
  c.data.resize_mode = "stretch"  # boxes are relative to the whole image
  c.data.sequence_length = sizes["length"]  # T, including the visual token slots
  c.data.image_tokens = (sizes["image"] // PATCH_SIZE) ** 2 // GROUP_SIZE
  if options.get("packed", False):
    # An example is its visual slots plus a short text (bench: 100-250 of 256 tokens), so a
    # row of T holds at most two and packs to 86-91%; rows of 2T hold 3-4 and pack to 92-94%
    # (docs/performance.md).
    c.data.packing = True
    c.data.sequence_length = 2 * sizes["length"]
  return c
