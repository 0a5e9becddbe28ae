"""Real tokens / token slots of a family's training batches, unpacked and packed.

  python bench/packing_efficiency.py [--config configs/minigpt_v2.py:bench]
                                     [--mixtures minigpt_v2_stage1,...] [--batches 16]
                                     [--bins 16,64] [--images 4] [--length T]
                                     [--set data.image_size=64 ...]

For each mixture: the unpacked iterator's efficiency, then the packed one's
(config.data.packing, data/packing.py) for each number of packing bins, over the same
number of batches of 8 rows, the packed rows' mean and largest number of examples (each
needs an image slot: `--images` bounds it) and the packed iterator's rows per second (host
side only). `--set` overrides config fields (`--config.a.b=v` of vlm-train), e.g. smaller
images where only the token counts matter and full-size ones do not fit in host memory.
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
  valid_key = packing.layout_of(families.load(family), family, data).valid_key
  return packing.efficiency(got, valid_key), rows_per_s, examples


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/minigpt_v2.py:bench")
  parser.add_argument("--mixtures", default="")
  parser.add_argument("--batches", type=int, default=16)
  parser.add_argument("--bins", default="16,64")
  parser.add_argument("--images", type=int, default=4)
  parser.add_argument("--length", type=int, default=0,
                      help="config.data.sequence_length (T of every row); 0: the config's")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, e.g. data.image_size=64 (repeatable)")
  args = parser.parse_args()
  config = config_lib.load_config(args.config, [o.split("=", 1) for o in args.set])
  family, data = config.model.name, config.data
  data.sequence_length = args.length or data.sequence_length
  print(f"{args.config}: T = {data.sequence_length}, {args.batches} batches of 8 rows, "
        f"{args.images} image slots per packed row")
  print("| mixture | unpacked | " + " | ".join(f"packed, {b} bins" for b in
                                                args.bins.split(",")) + " |")
  print("|---|---|" + "---|" * len(args.bins.split(",")))
  for mixture in (args.mixtures.split(",") if args.mixtures else [data.mixture]):
    data.mixture, data.packing = mixture, False
    cells = [f"{measure(data, family, args.batches)[0]:.1%}"]
    data.packing, data.packed_images = True, args.images
    for bins in args.bins.split(","):
      data.packing_bins = int(bins)
      efficiency, rows, examples = measure(data, family, args.batches)
      cells.append(f"{efficiency:.1%} ({examples.mean():.2f} examples/row, max "
                   f"{examples.max()}; {rows:.0f} rows/s)")
    print(f"| {mixture} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  main()
