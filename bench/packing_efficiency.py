"""Real tokens / token slots of a family's training batches, unpacked and packed.

  python bench/packing_efficiency.py [--config configs/minigpt_v2.py:bench]
                                     [--mixtures minigpt_v2_stage1,...] [--batches 16]
                                     [--bins 16,64] [--images 4]

For each mixture: the unpacked iterator's efficiency, then the packed one's
(config.data.packing, data/packing.py) for each number of packing bins, over the same
number of batches of 8 rows, and the packed iterator's rows per second (host side only).
"""
import argparse
import time

from vlm_jax import config as config_lib
from vlm_jax.data import packing, pipeline


def measure(data, family: str, batches: int) -> tuple[float, float]:
  it = pipeline.make_train_iterator(data, family, global_batch_size=8, seed=0,
                                    process_index=0, process_count=1)
  next(it)  # warm-up: opening shards
  began = time.perf_counter()
  got = [next(it) for _ in range(batches)]
  return packing.efficiency(got), 8 * batches / (time.perf_counter() - began)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/minigpt_v2.py:bench")
  parser.add_argument("--mixtures", default="")
  parser.add_argument("--batches", type=int, default=16)
  parser.add_argument("--bins", default="16,64")
  parser.add_argument("--images", type=int, default=4)
  args = parser.parse_args()
  config = config_lib.load_config_file(args.config)
  family, data = config.model.name, config.data
  print(f"{args.config}: T = {data.sequence_length}, {args.batches} batches of 8 rows")
  print("| mixture | unpacked | " + " | ".join(f"packed, {b} bins" for b in
                                                args.bins.split(",")) + " |")
  print("|---|---|" + "---|" * len(args.bins.split(",")))
  for mixture in (args.mixtures.split(",") if args.mixtures else [data.mixture]):
    data.mixture, data.packing = mixture, False
    cells = [f"{measure(data, family, args.batches)[0]:.1%}"]
    data.packing, data.packed_images = True, args.images
    for bins in args.bins.split(","):
      data.packing_bins = int(bins)
      efficiency, rows = measure(data, family, args.batches)
      cells.append(f"{efficiency:.1%} ({rows:.0f} rows/s)")
    print(f"| {mixture} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  main()
