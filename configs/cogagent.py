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
image slots), `scan` (bool), `remat` (none|full|dots), `dtype` (float32|bfloat16).

Sizes — LM width / layers / heads / MLP / vocab; low-res ViT width / layers / heads / MLP,
adapter hidden, image px; high-res ViT width / layers / heads / MLP, image px; cross-attn
width / heads; text tokens after the (image/14)^2 + 2 image slots:

    tiny   128 /  2 /  4 /   344 / data (1024);   64 /  2 /  4 /   256,   344,  56;
            64 /  2 /  4 /  256, 112;   32 /  4;  T = 18 + 80
    bench 1024 /  4 / 16 /  2816 / data (1024);  768 /  4 / 12 /  3072,  2816, 224;
           384 /  4 /  6 / 1536, 336;  256 /  8;  T = 258 + 64
    18b   4096 / 32 / 32 / 11008 / 32000;       1792 / 63 / 16 / 15360, 11008, 224;
          1024 / 24 / 16 / 4096, 1120; 1024 / 32;  T = 258 + 256
          (Vicuna-7B; EVA2-CLIP-E; EVA2-CLIP-L-sized; visual expert on)

Param counts (jax.eval_shape; docs/models.md has the table and the command): 18b =
18.28B: visual 11.54B (low-res ViT 4.28B, adapter 0.14B, high-res ViT 0.31B,
cross-attention 0.34B, visual expert 6.48B) + language 6.74B (Vicuna-7B) — the paper says
11B visual + 7B language. tiny = 1.50M, bench = 153.7M.

Training: the low-res ViT is always frozen (stop-gradient). tiny/bench default to stage 0
(nothing here is pretrained); 18b to stage 1, as the paper's pre-training starts (it later
unfreezes the visual expert: stage 2). Batch/steps/lr per size are in TRAINING.
"""
import ml_collections

from vlm_jax import config as config_lib
from vlm_jax.data import defaults

# name: (width, layers, heads, mlp, vocab,
#        vit_width, vit_layers, vit_heads, vit_mlp, adapter_mlp, image,
#        hr_width, hr_layers, hr_heads, hr_mlp, high_res, cross_width, cross_heads, text)
SIZES = {
    "tiny": (128, 2, 4, 344, None, 64, 2, 4, 256, 344, 56, 64, 2, 4, 256, 112, 32, 4, 80),
    "bench": (1024, 4, 16, 2816, None, 768, 4, 12, 3072, 2816, 224, 384, 4, 6, 1536, 336,
              256, 8, 64),
    "18b": (4096, 32, 32, 11008, 32000, 1792, 63, 16, 15360, 11008, 224, 1024, 24, 16, 4096,
            1120, 1024, 32, 256),
}
DATA_VOCAB_SIZE = 1024  # the shipped SentencePiece model (data/tokenizer)
PATCH_SIZE = 14
# size: (batch_size, steps, peak lr, warmup, default stage)
TRAINING = {
    "tiny": (16, 150, 2e-3, 15, 0),
    "bench": (2, 50, 1e-4, 5, 0),  # batch 2: a CPU step stays ~10 s
    "18b": (4608, 60_000, 2e-5, 500, 1),  # paper: batch 4608, lr 2e-5 (from memory)
}
OPTIONS = {"stage": int, "visual_expert": bool, "cross_module": bool, "image": int,
           "high_res": int, "text": int, "scan": bool, "remat": str, "dtype": str}
_CROSS = r"cross_attention/|pre_cross_attention_norm/"
_EXPERT = r"vision_mlp/|self_attention/vision_"
# stage -> config.frozen (fullmatch regexes; layers are `layers/layers/...` when scanned,
# `layers/layers_i/...` when not)
FROZEN = {
    0: (r"vision/.*",),
    1: (r"vision/.*", r"adapter/.*", rf"lm/(?!layers/layers[^/]*/({_CROSS})).*"),
    2: (r"vision/.*", r"adapter/.*", rf"lm/(?!layers/layers[^/]*/({_CROSS}|{_EXPERT})).*"),
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  size, _, rest = arg.partition(",")
  if size not in SIZES:
    raise ValueError(f"cogagent size {size!r}: expected one of {sorted(SIZES)}.")
  options = config_lib.parse_options(rest, OPTIONS)
  (width, layers, heads, mlp, vocab, vit_width, vit_layers, vit_heads, vit_mlp, adapter_mlp,
   image, hr_width, hr_layers, hr_heads, hr_mlp, high_res, cross_width, cross_heads,
   text) = SIZES[size]
  batch, steps, lr, warmup, stage = TRAINING[size]
  stage = options.get("stage", stage)
  if stage not in FROZEN:
    raise ValueError(f"cogagent stage={stage}: expected one of {sorted(FROZEN)}.")
  cross_module = options.get("cross_module", True)
  visual_expert = options.get("visual_expert", True)
  if stage and not cross_module:
    raise ValueError(f"cogagent stage={stage} trains the cross-module; with "
                     "cross_module=False use stage=0.")
  if stage == 2 and not visual_expert:
    raise ValueError("cogagent stage=2 trains the visual expert; it needs visual_expert=True.")
  image = options.get("image", image)
  high_res = options.get("high_res", high_res)
  for name, pixels in (("image", image), ("high_res", high_res)):
    if pixels % PATCH_SIZE:
      raise ValueError(f"cogagent {name}={pixels} is not a multiple of the patch size "
                       f"{PATCH_SIZE}.")

  c = config_lib.base_config()
  c.batch_size = batch
  c.num_train_steps = steps
  c.optimizer.learning_rate = lr
  c.optimizer.warmup_steps = warmup
  c.optimizer.weight_decay = 0.05
  c.frozen = FROZEN[stage]

  m = c.model
  m.name = "cogagent"
  m.vocab_size = vocab or DATA_VOCAB_SIZE
  m.width = width
  m.num_layers = layers
  m.num_heads = heads
  m.mlp_dim = mlp
  m.visual_expert = visual_expert
  m.vision_width = vit_width
  m.vision_layers = vit_layers
  m.vision_heads = vit_heads
  m.vision_mlp_dim = vit_mlp
  m.patch_size = PATCH_SIZE
  m.adapter_mlp_dim = adapter_mlp
  m.cross_module = cross_module
  m.high_res_width = hr_width
  m.high_res_layers = hr_layers
  m.high_res_heads = hr_heads
  m.high_res_mlp_dim = hr_mlp
  m.high_res_patch_size = PATCH_SIZE
  m.cross_width = cross_width
  m.cross_heads = cross_heads
  m.scan_layers = options.get("scan", True)
  m.remat_policy = options.get("remat", "none")
  m.dtype = options.get("dtype", "float32")

  c.data = defaults.default_data_config()
  c.data.mixture = "cogagent_pretrain"
  c.data.converter = "cogagent"
  c.data.image_size = image
  c.data.high_res_image_size = high_res
  c.data.image_tokens = (image // PATCH_SIZE) ** 2 + 2  # + boi, eoi
  c.data.sequence_length = c.data.image_tokens + options.get("text", text)
  return c
