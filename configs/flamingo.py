r"""Flamingo / OpenFlamingo: frozen ViT + Perceiver Resampler + GATED XATTN-DENSE in a frozen LM.

    vlm-train --config configs/flamingo.py:tiny --workdir /tmp/flamingo_tiny
    vlm-info  --config configs/flamingo.py:80b
    vlm-info  --config configs/flamingo.py:of9b
    python bench/train_step.py configs/flamingo.py:bench

`arg` = size name, then optional comma-separated `key=value` options: `frames` (int > 0:
every media item is a clip of that many frames, with learned time embeddings; still images
are repeated), `immediate` (bool, default True: a token attends to the most recent image
only; False: to all previous images), `scan` (bool), `remat` (none|full|dots), `dtype`
(float32|bfloat16).

Sizes. LM width / layers / heads / MLP / vocab (style); vision width / layers / heads / MLP /
patch / image px; resampler layers / latents / heads x head dim / FFW activation;
cross-attention placement / heads x head dim / FFW activation:

  tiny    128/2/4/512/1024 (chin)      64/1/2/256/16/64     2/16/2x32/gelu   every layer 4x32 gelu
  bench  1024/4/16/4096/1024 (mpt)    768/4/12/3072/14/112  2/64/8x64/gelu   every 2nd   8x64 gelu
  3b     2048/24/16/8192/32000 (chin) 1536/15/16/6144/16/320 6/64/16x128/sq   every layer 16x128 sq
  9b     4096/32/32/16384/32000 (chin) as 3b                 as 3b            every 4th   16x128 sq
  80b    8192/80/64/32768/32000 (chin) as 3b                 as 3b            12 blocks (~every 7th)
  of3b   MPT-1B 2048/24/16/8192/50432  CLIP ViT-L/14 1024/24/16/4096/14/224  6/64/8x64/gelu
                                                                           every layer 8x64 gelu
  of4b   RedPajama-3B 2560/32/32/10240/50432 (neox) as of3b  as of3b         every 2nd   8x64 gelu
  of9b   MPT-7B 4096/32/32/16384/50432 as of3b                as of3b         every 4th   8x64 gelu

Styles: mpt = LayerNorm without bias, GELU MLP, tied embeddings, ALiBi (MPT-7B's layout;
MPT-1B-RedPajama adds QK LayerNorm and biases, which we do not have); neox = LayerNorm with
bias, biased GELU MLP, parallel residual, untied; chin (Chinchilla-like, the paper's LMs) =
RMSNorm, GELU MLP, no bias, untied. The paper's NFNet-F6 (435M) is stood in for by a ViT of
similar size (425M, width 1536 = the resampler width the paper reports). The of* sizes feed
the resampler the ViT's tokens before its final LayerNorm (`vision_post_norm='class'`), as
OpenFlamingo did with open_clip < 2.23, so the released weights import unchanged
(docs/weights.md). Placement: OpenFlamingo inserts a block before layer i when
(i+1) % interval == 0; the paper's every-7th for 80 layers is not periodic in
units of 7 (80 % 7 != 0), so 80b scans units of 20 layers with blocks before sublayers 6, 13
and 19 (12 blocks, gaps 7/6). Param counts vs published: docs/models.md.
"""
import ml_collections

from vlm_jax import config as config_lib
from vlm_jax.data import defaults
from vlm_jax.models import flamingo as model_lib

DATA_VOCAB_SIZE = 1024  # the shipped SentencePiece model (data/tokenizer)

LM_STYLES = {
    "mpt": dict(norm_type="layernorm", use_bias=False, mlp_activation="gelu",
                tie_embeddings=True, position="alibi"),
    "neox": dict(norm_type="layernorm", use_bias=True, mlp_activation="gelu",
                 parallel_residual=True),
    "chin": dict(norm_type="rmsnorm", use_bias=False, mlp_activation="gelu"),
}
CLIP_VIT_L14 = (1024, 24, 16, 4096, 14, 224)
NFNET_F6_STANDIN = (1536, 15, 16, 6144, 16, 320)
OF_RESAMPLER = (6, 64, 8, 64, "gelu")
PAPER_RESAMPLER = (6, 64, 16, 128, "squared_relu")

# name: (LM (width, layers, heads, mlp, vocab, style), vision (width, layers, heads, mlp,
#        patch, image), resampler (layers, latents, heads, head dim, activation),
#        cross-attention ((group, sublayers), heads, head dim, activation),
#        data (sequence length, max images))
SIZES = {
    "tiny": ((128, 2, 4, 512, None, "chin"), (64, 1, 2, 256, 16, 64), (2, 16, 2, 32, "gelu"),
             ((1, (0,)), 4, 32, "gelu"), (128, 4)),
    "bench": ((1024, 4, 16, 4096, None, "mpt"), (768, 4, 12, 3072, 14, 112),
              (2, 64, 8, 64, "gelu"), ((2, (1,)), 8, 64, "gelu"), (256, 2)),
    "3b": ((2048, 24, 16, 8192, 32000, "chin"), NFNET_F6_STANDIN, PAPER_RESAMPLER,
           ((1, (0,)), 16, 128, "squared_relu"), (256, 5)),
    "9b": ((4096, 32, 32, 16384, 32000, "chin"), NFNET_F6_STANDIN, PAPER_RESAMPLER,
           ((4, (3,)), 16, 128, "squared_relu"), (256, 5)),
    "80b": ((8192, 80, 64, 32768, 32000, "chin"), NFNET_F6_STANDIN, PAPER_RESAMPLER,
            ((20, (6, 13, 19)), 16, 128, "squared_relu"), (256, 5)),
    "of3b": ((2048, 24, 16, 8192, 50432, "mpt"), CLIP_VIT_L14, OF_RESAMPLER,
             (model_lib.openflamingo_placement(1), 8, 64, "gelu"), (256, 6)),
    "of4b": ((2560, 32, 32, 10240, 50432, "neox"), CLIP_VIT_L14, OF_RESAMPLER,
             (model_lib.openflamingo_placement(2), 8, 64, "gelu"), (256, 6)),
    "of9b": ((4096, 32, 32, 16384, 50432, "mpt"), CLIP_VIT_L14, OF_RESAMPLER,
             (model_lib.openflamingo_placement(4), 8, 64, "gelu"), (256, 6)),
}
# size: (batch_size, steps, peak lr, warmup)
TRAINING = {"tiny": (8, 120, 3e-3, 10), "bench": (4, 50, 1e-4, 5)}
PAPER_TRAINING = (256, 500_000, 1e-4, 5000)  # OpenFlamingo-like; the paper's: see docs
OPTIONS = {"frames": int, "immediate": bool, "scan": bool, "remat": str, "dtype": str}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  size, _, rest = arg.partition(",")
  if size not in SIZES:
    raise ValueError(f"flamingo size {size!r}: expected one of {sorted(SIZES)}.")
  options = config_lib.parse_options(rest, OPTIONS)
  lm, vision, resampler, xattn, (length, max_images) = SIZES[size]
  batch, steps, lr, warmup = TRAINING.get(size, PAPER_TRAINING)
  frames = options.get("frames", 0)
  if frames < 0:
    raise ValueError(f"flamingo option frames={frames}: expected >= 0.")

  c = config_lib.base_config()
  c.batch_size = batch
  c.num_train_steps = steps
  c.optimizer.learning_rate = lr
  c.optimizer.warmup_steps = warmup
  c.optimizer.weight_decay = 0.1
  c.frozen = model_lib.frozen_patterns()

  m = c.model
  m.name = "flamingo"
  width, layers, heads, mlp, vocab, style = lm
  m.vocab_size = vocab or DATA_VOCAB_SIZE
  m.width, m.num_layers, m.num_heads, m.mlp_dim = width, layers, heads, mlp
  for key, value in LM_STYLES[style].items():
    m[key] = value
  (m.vision_width, m.vision_layers, m.vision_heads, m.vision_mlp_dim, m.patch_size,
   image) = vision
  if vision == CLIP_VIT_L14:  # OpenFlamingo's resampler reads open_clip's un-normed tokens
    m.vision_post_norm = "class"
  (m.resampler_layers, m.num_latents, m.resampler_heads, m.resampler_head_dim,
   m.resampler_activation) = resampler
  (m.xattn_group, m.xattn_sublayers), m.xattn_heads, m.xattn_head_dim, m.xattn_activation = xattn
  m.resampler_mlp_ratio = m.xattn_mlp_ratio = 4  # both papers
  m.max_frames = frames
  m.only_attend_immediate = options.get("immediate", True)
  m.scan_layers = options.get("scan", True)
  m.remat_policy = options.get("remat", "none")
  m.dtype = options.get("dtype", "float32")

  c.data = defaults.default_data_config()
  c.data.mixture = "pretrain_flamingo"
  c.data.converter = "flamingo"
  c.data.image_size = image
  c.data.sequence_length = length
  c.data.max_images = max_images
  c.data.frames_per_media = frames
  return c
