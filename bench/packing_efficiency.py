"""Real tokens / token slots of a family's training batches, unpacked and packed.

  python bench/packing_efficiency.py [--config configs/minigpt_v2.py:bench]
                                     [--mixtures minigpt_v2_stage1,...] [--batches 16]
                                     [--bins 16,64] [--images K] [--length T]
                                     [--set data.image_size=64 ...]

For each mixture: the unpacked iterator's efficiency, then the packed one's
(config.data.packing, data/packing.py) for each number of packing bins, over the same
number of batches of 8 rows, the packed rows' mean and largest number of examples (each
needs an image slot: `--images` bounds it; default the config's `packed_images`, e.g.
`configs/flamingo.py:bench,packed=True`'s 12) and the packed iterator's rows per second
(host side only). Real tokens and slots are counted by the family's layout
(`PACKING.efficiency`): one token stream for decoder-only families, both streams and the
image tokens for encoder-decoder ones (data/packing_encoder_decoder.py).
`--config configs/simvlm.py:bench,packed=True` keeps that config's packed row lengths
(`packed_prefix_length`, `packed_suffix_length`).
`--set` overrides config fields (`--config.a.b=v` of vlm-train), e.g. smaller images where
only the token counts matter and full-size ones do not fit in host memory.
"""
import argparse
import time

import numpy as np

from vlm_jax import config as config_lib
from vlm_jax.data import families, packing, pipeline


def measure(data, family: str, batches: int) -> tuple[float, float, np.ndarray]:
  """(real tokens / slots, rows/s, examples in each row)."""
  it = pipeline.make_train_iterator(data, family, global_batch_size=8, seed=0,
                                    process_index=0, process_count=1)
  next(it)  # warm-up: opening shards
  began = time.perf_counter()
  got = [next(it) for _ in range(batches)]
  rows_per_s = 8 * batches / (time.perf_counter() - began)
  examples = np.concatenate([b[packing.SEGMENT_IDS].max(1) if packing.SEGMENT_IDS in b else
                             np.ones(len(b["tokens"]), int) for b in got])
  layout = packing.layout_of(families.load(family), family, data)
  return layout.efficiency(got, data), rows_per_s, examples


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/minigpt_v2.py:bench")
  parser.add_argument("--mixtures", default="")
  parser.add_argument("--batches", type=int, default=16)
  parser.add_argument("--bins", default="16,64")
  parser.add_argument("--images", type=int, default=0,
                      help="config.data.packed_images (slots per row); 0: the config's")
  parser.add_argument("--length", type=int, default=0,
                      help="config.data.sequence_length (T of every row); 0: the config's")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, e.g. data.image_size=64 (repeatable)")
  args = parser.parse_args()
  config = config_lib.load_config(args.config, [o.split("=", 1) for o in args.set])
  family, data = config.model.name, config.data
  data.sequence_length = args.length or data.sequence_length
  data.packed_images = args.images or data.packed_images
  rows = {k: data.get(k) for k in ("sequence_length", "packed_prefix_length",
                                   "packed_suffix_length") if data.get(k)}
  print(f"{args.config}: {rows}, {args.batches} batches of 8 rows, {data.packed_images} "
        "image slots per packed row")
  print("| mixture | unpacked | " + " | ".join(f"packed, {b} bins" for b in
                                                args.bins.split(",")) + " |")
  print("|---|---|" + "---|" * len(args.bins.split(",")))
  for mixture in (args.mixtures.split(",") if args.mixtures else [data.mixture]):
    data.mixture, data.packing = mixture, False
    cells = [f"{measure(data, family, args.batches)[0]:.1%}"]
    data.packing = True
    for bins in args.bins.split(","):
      data.packing_bins = int(bins)
      efficiency, rows, examples = measure(data, family, args.batches)
      cells.append(f"{efficiency:.1%} ({examples.mean():.2f} examples/row, max "
                   f"{examples.max()}; {rows:.0f} rows/s)")
    print(f"| {mixture} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  main()
