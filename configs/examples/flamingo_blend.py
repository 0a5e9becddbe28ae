r"""Flamingo pretraining on your own blend: image-text pairs, interleaved documents and text.

    # 1. ingest each source once (validated, filtered ArrayRecord shards; data/README.md)
    vlm-data ingest --format img2dataset --input '/data/laion/*.tar' --output /data/vlm/laion
    vlm-data ingest --format img2dataset --input '/data/coyo/*.tar' --output /data/vlm/coyo
    vlm-data ingest --format mmc4 --input '/data/mmc4/*.jsonl' \
        --images '/data/mmc4_images/*.tar' --output /data/vlm/mmc4
    vlm-data ingest --format obelics --input '/data/obelics/*.parquet' \
        --images '/data/obelics_images/*.tar' --output /data/vlm/obelics
    vlm-data ingest --format text --input '/data/c4/*.jsonl' --output /data/vlm/c4
    # 2. the blend as the model sees it, with the realised rates
    vlm-data inspect --config configs/examples/flamingo_blend.py:tiny,root=/data/vlm
    # 3. train (any size of configs/flamingo.py)
    vlm-train --config configs/examples/flamingo_blend.py:of9b,root=/data/vlm --workdir /runs/of9b

`arg`: configs/flamingo.py's argument (a size, then its options) plus `root=DIR`, the
directory holding the ingested sources (default /data/vlm).

The blend (config.data.mixture as a list of sources, vlm_jax/data/mixture.py):

    source   kind         rate  loss weight
    laion    pairs        0.5   0.2    image-text pairs, rate 1.0 in all: the paper's
    coyo     pairs        0.5   0.2      ALIGN / LTIP loss weight
    mmc4     interleaved  0.5   1.0    interleaved web documents, rate 1.0 in all: the
    obelics  interleaved  0.5   1.0      paper's M3W loss weight
    c4       text         0.2   1.0    text-only documents (Flamingo's `text` template)

Loss weights are the paper's (arXiv 2204.14198: M3W 1.0, ALIGN 0.2, LTIP 0.2, VTP 0.03 for
video, which this blend has none of). The paper accumulates gradients over one batch per
dataset; here one batch mixes the sources by rate and each example's token losses are
scaled by its source's weight (`data/rate/<source>` in the metrics reports the realised
rates). The paper mixes in no text-only data: a text document has no media, so of the
trainable parameters only the gated blocks' feed-forward layers learn from it (and the LM,
when config.frozen leaves it trainable).
"""
import os

from vlm_jax import config as config_lib

CONFIGS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = "/data/vlm"
# name: (rate, loss weight)
BLEND = {"laion": (0.5, 0.2), "coyo": (0.5, 0.2), "mmc4": (0.5, 1.0), "obelics": (0.5, 1.0),
         "c4": (0.2, 1.0)}


def get_config(arg: str = "tiny"):
  options = arg.split(",")
  root = next((o[len("root="):] for o in options if o.startswith("root=")), ROOT)
  family_arg = ",".join(o for o in options if not o.startswith("root="))
  c = config_lib.load_config_file(os.path.join(CONFIGS, "flamingo.py") + ":" + family_arg)
  c.data.mixture = tuple(
      dict(source=os.path.join(root, name), name=name, rate=rate, loss_weight=weight)
      for name, (rate, weight) in BLEND.items())
  return c
