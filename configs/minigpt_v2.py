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
`dtype` (float32|bfloat16).

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
from vlm_jax.data import defaults

# name: (width, layers, heads, mlp, vocab, vit_width, vit_layers, vit_heads, vit_mlp,
#        image, text_length, lora_rank)
SIZES = {
    "tiny": (128, 2, 4, 344, None, 96, 2, 4, 384, 112, 160, 8),
    "bench": (1024, 4, 16, 2816, None, 768, 4, 12, 3072, 224, 256, 64),
    "7b": (4096, 32, 32, 11008, 32000, 1408, 39, 16, 6144, 448, 512, 64),
}
DATA_VOCAB_SIZE = 1024  # the shipped SentencePiece model (data/tokenizer)
PATCH_SIZE, GROUP_SIZE = 14, 4
# (size, stage): (batch_size, steps, peak lr, warmup)
TRAINING = {
    ("tiny", 1): (16, 200, 1e-3, 20), ("tiny", 2): (16, 150, 5e-4, 15),
    ("tiny", 3): (16, 150, 5e-4, 15),
    ("bench", 1): (8, 50, 1e-4, 5), ("bench", 2): (8, 50, 1e-5, 5),
    ("bench", 3): (8, 50, 1e-5, 5),
    ("7b", 1): (96, 400_000, 1e-4, 1000), ("7b", 2): (64, 50_000, 1e-5, 1000),
    ("7b", 3): (24, 35_000, 1e-5, 1000),
}
STAGE_MIXTURES = {1: "minigpt_v2_stage1", 2: "minigpt_v2_stage2", 3: "minigpt_v2_stage3"}
OPTIONS = {"stage": int, "init_from": str, "freeze_lm": bool, "scan": bool, "remat": str,
           "dtype": str}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  size, _, rest = arg.partition(",")
  if size not in SIZES:
    raise ValueError(f"minigpt_v2 size {size!r}: expected one of {sorted(SIZES)}.")
  options = config_lib.parse_options(rest, OPTIONS)
  stage = options.get("stage", 1)
  if stage not in STAGE_MIXTURES:
    raise ValueError(f"minigpt_v2 stage={stage}: expected 1, 2 or 3.")
  (width, layers, heads, mlp, vocab, vit_width, vit_layers, vit_heads, vit_mlp, image,
   text_length, lora_rank) = SIZES[size]
  batch, steps, lr, warmup = TRAINING[(size, stage)]

  c = config_lib.base_config()
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
  m.name = "minigpt_v2"
  m.vocab_size = vocab or DATA_VOCAB_SIZE
  m.width = width
  m.num_layers = layers
  m.num_heads = heads
  m.mlp_dim = mlp
  m.lora_targets = ("query", "value")
  m.lora_rank = lora_rank
  m.lora_alpha = 16.0
  m.lora_dropout_rate = 0.05
  m.vision_width = vit_width
  m.vision_layers = vit_layers
  m.vision_heads = vit_heads
  m.vision_mlp_dim = vit_mlp
  m.patch_size = PATCH_SIZE
  m.group_size = GROUP_SIZE
  m.scan_layers = options.get("scan", True)
  m.remat_policy = options.get("remat", "none")
  m.dtype = options.get("dtype", "float32")

  c.data = defaults.default_data_config()
  c.data.mixture = STAGE_MIXTURES[stage]
  c.data.converter = "minigpt_v2"
  c.data.image_size = image
  c.data.resize_mode = "stretch"  # boxes are relative to the whole image
  c.data.sequence_length = text_length  # T, including the visual token slots
  c.data.image_tokens = (image // PATCH_SIZE) ** 2 // GROUP_SIZE
  return c
