"""Examples/s of the SimVLM data pipeline at 224 px with 0, 1 and 2 grain workers.

  python bench/data_throughput.py [--pairs 2000] [--batch 32] [--seconds 10]

Generates 256-px sample pairs once (webdataset, as img2dataset writes them) in a temp dir,
then times the full path: tar read, JPEG decode, resize to 224, normalise, tokenise,
PrefixLM convert, mix with text, batch. The first batches (worker start-up) are excluded.
"""
import argparse
import json
import os
import tempfile
import time

from absl import flags


def measure(data_config, batch, seconds):
  from vlm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  it = pipeline.make_train_iterator(data_config, "simvlm", global_batch_size=batch, seed=0,
                                    process_index=0, process_count=1)
  for _ in range(2):
    next(it)
  first = time.perf_counter() - start
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    next(it)
    count += batch
  rate = count / (time.perf_counter() - start)
  it.close()
  return first, rate


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--pairs", type=int, default=2000)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--seconds", type=float, default=10.0)
  parser.add_argument("--workers", default="0,1,2")
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()

  from vlm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from vlm_jax.data.synthetic import sample_data  # pylint: disable=g-import-not-at-top
  root = os.path.join(tempfile.gettempdir(), f"vlm_jax_bench_{args.pairs}")
  sizes = sample_data.SyntheticSizes(train_pairs=args.pairs, validation_pairs=64,
                                   train_docs=1000, validation_docs=64, train_interleaved=0,
                                   validation_interleaved=0, shard_size=1000, image_size=256)
  start = time.perf_counter()
  sample_data.ensure_sample_data(root, sizes)
  print(f"sample data ready in {time.perf_counter() - start:.1f} s ({root})")

  results = []
  for workers in (int(w) for w in args.workers.split(",")):
    cfg = config_lib.load_config("configs/simvlm.py:tiny").data
    cfg.data_dir, cfg.image_size, cfg.num_workers = root, 224, workers
    first, rate = measure(cfg, args.batch, args.seconds)
    results.append({"num_workers": workers, "examples_per_s": round(rate, 1),
                    "first_batches_s": round(first, 2), "image_size": 224,
                    "batch": args.batch, "cpus": os.cpu_count()})
    print(json.dumps(results[-1]))


if __name__ == "__main__":
  main()
