r"""Flamingo / OpenFlamingo: frozen ViT + Perceiver Resampler + GATED XATTN-DENSE in a frozen LM.

    vlm-train --config configs/flamingo.py:tiny --workdir /tmp/flamingo_tiny
    vlm-info  --config configs/flamingo.py:80b
    vlm-info  --config configs/flamingo.py:of9b
    python bench/train_step.py configs/flamingo.py:bench configs/flamingo.py:bench,packed=True

`arg` = size name, then optional comma-separated `key=value` options: `frames` (int > 0:
every media item is a clip of that many frames, with learned time embeddings; still images
are repeated), `immediate` (bool, default True: a token attends to the most recent image
only; False: to all previous images), `packed` (bool: config.data.packing, several
documents per row with their images in `packed_images` slots; data/packing.py), `scan`
(bool), `remat` (none|full|dots), `dtype` (float32|bfloat16).

Sizes (SIZES below, one sub-config per part): LM width / layers / heads / MLP / vocab
(style); vision width / layers / heads / MLP / patch / image px; resampler layers / latents /
heads x head dim / FFW activation; cross-attention placement / heads x head dim / FFW:

  tiny    128/2/4/512/1024 (chin)      64/1/2/256/16/64     2/16/2x32/gelu   every layer 4x32 gelu
  bench  1024/4/16/4096/1024 (mpt)    768/4/12/3072/14/112  2/64/8x64/gelu   every 2nd   8x64 gelu
  3b     2048/24/16/8192/32000 (chin) 1536/15/16/6144/16/320 6/64/16x128/sq   every layer 16x128 sq
  9b     4096/32/32/16384/32000 (chin) as 3b                 as 3b            every 4th   16x128 sq
  80b    8192/80/64/32768/32000 (chin) as 3b                 as 3b            12 blocks (~every 7th)
  oftiny 128/2/4/512/1024 (mpt)       64/1/2/256/16/64     6/64/8x64/gelu   every layer 8x64 gelu
  of3b   MPT-1B 2048/24/16/8192/50432  CLIP ViT-L/14 1024/24/16/4096/14/224  6/64/8x64/gelu
                                                                           every layer 8x64 gelu
  of4b   RedPajama-3B 2560/32/32/10240/50432 (neox) as of3b  as of3b         every 2nd   8x64 gelu
  of9b   MPT-7B 4096/32/32/16384/50432 as of3b                as of3b         every 4th   8x64 gelu

Styles: mpt = LayerNorm without bias, GELU MLP, tied embeddings, ALiBi (MPT-7B's layout;
MPT-1B-RedPajama adds QK LayerNorm and biases, which we do not have); neox = LayerNorm with
bias, biased GELU MLP, parallel residual, untied; chin (Chinchilla-like, the paper's LMs) =
RMSNorm, GELU MLP, no bias, untied. The paper's NFNet-F6 (435M) is stood in for by a ViT of
similar size (425M, width 1536 = the resampler width the paper reports). The of* sizes feed
the resampler the ViT's tokens before its final LayerNorm (`vision.post_norm='class'`), as
OpenFlamingo did with open_clip < 2.23, so the released weights import unchanged
(docs/weights.md). Placement: OpenFlamingo inserts a block before
layer i when (i+1) % interval == 0; the paper's every-7th for 80 layers is not periodic in
units of 7 (80 % 7 != 0), so 80b scans units of 20 layers with blocks before sublayers 6, 13
and 19 (12 blocks, gaps 7/6). Param counts vs published: docs/models.md.
"""
import ml_collections

from vlm_jax import config as config_lib
from vlm_jax.models import flamingo as model_lib
from vlm_jax.nn import vit

DATA_VOCAB_SIZE = 1024  # the shipped SentencePiece model (vlm_jax/data/tokenizer)

LM_STYLES = {
    "mpt": dict(norm_type="layernorm", use_bias=False, mlp_activation="gelu",
                tie_embeddings=True, position="alibi"),
    "neox": dict(norm_type="layernorm", use_bias=True, mlp_activation="gelu",
                 parallel_residual=True),
    "chin": dict(norm_type="rmsnorm", use_bias=False, mlp_activation="gelu"),
}


def lm(style, width, num_layers, num_heads, mlp_dim, vocab_size=DATA_VOCAB_SIZE):
  return dict(LM_STYLES[style], width=width, num_layers=num_layers, num_heads=num_heads,
              mlp_dim=mlp_dim, vocab_size=vocab_size)


CLIP_LAYOUT = dict(mlp_activation="quick_gelu", class_token=True, pre_norm=True,
                   patch_bias=False)
# OpenFlamingo's resampler reads open_clip's un-normed tokens (post_norm='class')
CLIP_VIT_L14 = dict(vit.variant("L/14"), **CLIP_LAYOUT, post_norm="class")
NFNET_F6_STANDIN = dict(width=1536, depth=15, num_heads=16, mlp_dim=6144, patch_size=16,
                        **CLIP_LAYOUT)
OF_RESAMPLER = dict(num_layers=6, num_latents=64, num_heads=8, head_dim=64,
                    mlp_activation="gelu")
PAPER_RESAMPLER = dict(num_layers=6, num_latents=64, num_heads=16, head_dim=128,
                       mlp_activation="squared_relu")
OF_XATTN = dict(num_heads=8, head_dim=64, mlp_activation="gelu")
PAPER_XATTN = dict(num_heads=16, head_dim=128, mlp_activation="squared_relu")

# name: sub-configs of the parts, the gated blocks' placement (xattn_group, xattn_sublayers)
# and the data (image px, sequence length, max images per example).
SIZES = {
    "tiny": dict(
        lm=lm("chin", 128, 2, 4, 512),
        vision=dict(width=64, depth=1, num_heads=2, mlp_dim=256, patch_size=16, **CLIP_LAYOUT),
        resampler=dict(num_layers=2, num_latents=16, num_heads=2, head_dim=32,
                       mlp_activation="gelu"),
        xattn=dict(num_heads=4, head_dim=32, mlp_activation="gelu"), placement=(1, (0,)),
        image=64, length=128, max_images=4),
    "bench": dict(
        lm=lm("mpt", 1024, 4, 16, 4096),
        vision=dict(vit.variant("B/14", depth=4), **CLIP_LAYOUT),
        resampler=dict(OF_RESAMPLER, num_layers=2), xattn=OF_XATTN, placement=(2, (1,)),
        image=112, length=256, max_images=2),
    "3b": dict(lm=lm("chin", 2048, 24, 16, 8192, 32000), vision=NFNET_F6_STANDIN,
               resampler=PAPER_RESAMPLER, xattn=PAPER_XATTN, placement=(1, (0,)),
               image=320, length=256, max_images=5),
    "9b": dict(lm=lm("chin", 4096, 32, 32, 16384, 32000), vision=NFNET_F6_STANDIN,
               resampler=PAPER_RESAMPLER, xattn=PAPER_XATTN, placement=(4, (3,)),
               image=320, length=256, max_images=5),
    "80b": dict(lm=lm("chin", 8192, 80, 64, 32768, 32000), vision=NFNET_F6_STANDIN,
                resampler=PAPER_RESAMPLER, xattn=PAPER_XATTN, placement=(20, (6, 13, 19)),
                image=320, length=256, max_images=5),
    # OpenFlamingo's layout at tiny widths (a released-layout import test's target): an MPT
    # LM, an open_clip ViT, open_flamingo's fixed resampler and gated-block sizes.
    "oftiny": dict(lm=lm("mpt", 128, 2, 4, 512),
                   vision=dict(width=64, depth=1, num_heads=2, mlp_dim=256, patch_size=16,
                               **CLIP_LAYOUT, post_norm="class"),
                   resampler=OF_RESAMPLER, xattn=OF_XATTN,
                   placement=model_lib.openflamingo_placement(1),
                   image=64, length=128, max_images=4),
    "of3b": dict(lm=lm("mpt", 2048, 24, 16, 8192, 50432), vision=CLIP_VIT_L14,
                 resampler=OF_RESAMPLER, xattn=OF_XATTN,
                 placement=model_lib.openflamingo_placement(1),
                 image=224, length=256, max_images=6),
    "of4b": dict(lm=lm("neox", 2560, 32, 32, 10240, 50432), vision=CLIP_VIT_L14,
                 resampler=OF_RESAMPLER, xattn=OF_XATTN,
                 placement=model_lib.openflamingo_placement(2),
                 image=224, length=256, max_images=6),
    "of9b": dict(lm=lm("mpt", 4096, 32, 32, 16384, 50432), vision=CLIP_VIT_L14,
                 resampler=OF_RESAMPLER, xattn=OF_XATTN,
                 placement=model_lib.openflamingo_placement(4),
                 image=224, length=256, max_images=6),
}
# size: (batch_size, steps, peak lr, warmup)
TRAINING = {"tiny": (8, 120, 3e-3, 10), "oftiny": (8, 120, 3e-3, 10), "bench": (4, 50, 1e-4, 5)}
PAPER_TRAINING = (256, 500_000, 1e-4, 5000)  # OpenFlamingo-like; the paper's: see docs
OPTIONS = {"frames": int, "immediate": bool, "packed": bool}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  size, options = config_lib.parse_arg(arg, SIZES, OPTIONS, "flamingo")
  sizes = SIZES[size]
  batch, steps, lr, warmup = TRAINING.get(size, PAPER_TRAINING)
  frames = options.get("frames", 0)
  if frames < 0:
    raise ValueError(f"flamingo option frames={frames}: expected >= 0.")

  c = config_lib.base_config("flamingo", options)
  c.batch_size = batch
  c.num_train_steps = steps
  c.optimizer.learning_rate = lr
  c.optimizer.warmup_steps = warmup
  c.optimizer.weight_decay = 0.1
  c.frozen = model_lib.frozen_patterns()

  m = c.model
  m.lm = sizes["lm"]
  m.vision = sizes["vision"]
  m.resampler = dict(sizes["resampler"], mlp_ratio=4, num_frames=frames)  # both papers: x4
  m.xattn = dict(sizes["xattn"], mlp_ratio=4)
  m.xattn_group, m.xattn_sublayers = sizes["placement"]
  m.only_attend_immediate = options.get("immediate", True)
  m.new_token_ids = (4, 5)  # <image>, <|endofchunk|> (vlm_jax/data/vocab.py)

  c.data.mixture = "pretrain_flamingo"
  c.data.image_size = sizes["image"]
  c.data.sequence_length = sizes["length"]
  c.data.max_images = sizes["max_images"]
  c.data.frames_per_media = frames
  if options.get("packed", False):
    # Several documents and pairs per row of T (data/packing.py). A pair or short document
    # is ~20 tokens per image (bench mixture: 37 tokens, 1.8 images), so the row's images,
    # not its tokens, bound how many fit: one slot per 20 tokens, and at least two full
    # documents' worth (bench: 12 slots, 97% real tokens; docs/performance.md).
    c.data.packing = True
    c.data.packed_images = max(sizes["length"] // 20, 2 * sizes["max_images"])
  return c
