"""Records/s of `vlm-data ingest`: the local runner vs the Beam DirectRunner, same input.

  python bench/ingest_throughput.py [--pairs 4000] [--shard-size 500] \\
      [--beam 'multi_processing:2,multi_threading:2']

Generates 256-px sample pairs once (img2dataset webdataset tars, 500 per tar) in a temp dir,
then ingests them with the same filters (min side 64, similarity >= 0.3, dedup by image and
url) with each runner; every Beam output is checked to be byte-identical to the local one.
Times include pipeline start-up (worker processes for multi_processing).
"""
import argparse
import filecmp
import glob
import json
import os
import tempfile
import time


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--pairs", type=int, default=4000)
  parser.add_argument("--shard-size", type=int, default=500)
  parser.add_argument("--beam", default="multi_processing:2,multi_threading:2",
                      help="comma-separated MODE:WORKERS DirectRunner settings")
  args = parser.parse_args()

  from vlm_jax.data import filters, ingest, synthetic  # pylint: disable=g-import-not-at-top
  root = os.path.join(tempfile.gettempdir(), f"vlm_jax_ingest_bench_{args.pairs}")
  sizes = synthetic.SyntheticSizes(train_pairs=args.pairs, validation_pairs=64,
                                   train_docs=64, validation_docs=64, train_interleaved=0,
                                   validation_interleaved=0, shard_size=500, image_size=256)
  synthetic.ensure_sample_data(root, sizes)
  pattern = os.path.join(root, synthetic.SUBDIR, "pairs", "train", "*.tar")
  options = dict(shard_size=args.shard_size, filters=filters.Filters.from_strings(
      min_image_side=64, min_meta=["similarity=0.3"], dedup="image,url"))
  out = tempfile.mkdtemp(prefix="vlm_jax_ingest_bench_out_")

  runs = [("local", "local", [])]
  for item in args.beam.split(","):
    mode, workers = item.split(":")
    runs.append((f"beam {mode} x{workers}", "beam",
                 [f"direct_num_workers={workers}", f"direct_running_mode={mode}"]))
  for name, runner, beam_options in runs:
    target = os.path.join(out, name.replace(" ", "_"))
    start = time.perf_counter()
    manifest = ingest.run("img2dataset", pattern, target, runner=runner,
                          beam_options=beam_options, **options)
    seconds = time.perf_counter() - start
    records_in = ingest.read_statistics(target)["records_in"]
    same = all(filecmp.cmp(p, p.replace(target, os.path.join(out, "local")), shallow=False)
               for p in glob.glob(os.path.join(target, "*.array_record")))
    print(json.dumps({"runner": name, "records_in": records_in,
                      "records_out": manifest["records"], "seconds": round(seconds, 2),
                      "records_in_per_s": round(records_in / seconds, 1),
                      "same_as_local": same, "cpus": os.cpu_count()}))


if __name__ == "__main__":
  main()
