"""The training path with its data and workdir in gs:// (a GCS API served on localhost,
fake-gcs-server) against local disk:

  python bench/gcs_training.py [--pairs 2000] [--batch 32] [--seconds 20] [--workers 0,2]
                               [--starts 3] [--config configs/simvlm.py:tiny]

1. Data: sample pairs (256 px JPEGs, as img2dataset writes them) ingested once into ArrayRecord
   shards on local disk and copied to gs://. Then (a) records/s of our ArrayRecordSource
   (grain's random access, one ranged GET per record from gs://) over a shuffled pass, and
   (b) examples/s of the SimVLM training pipeline reading the ingested directory as its
   mixture (decode, resize to 224, tokenise, batch: bench/data_throughput.py's `measure`),
   with 0 and 2 grain workers.
2. The second start of `vlm-train` (the rerun of a preempted job): a first start trains 2
   steps into a gs:// workdir (filling its checkpoint and, unless off, the persistent
   compilation cache); each timed second start resumes it to step 4. Caches: none
   (`--config.compilation_cache_dir=none`), the default <workdir>/jax_cache in gs://, and a
   local directory. Timed from the process start: the "Model FLOPs" line (state restored,
   nothing compiled yet), the first step line (train step compiled and run), and the exit.
   The schedule is constant so the step does not depend on num_train_steps (one cache entry).
   Medians of --starts starts, interleaved across the caches.
"""
import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time

from absl import flags

from data_throughput import measure  # bench/ is this script's directory
from vlm_jax import storage
from vlm_jax.gcs_emulator import LocalGCS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def records_per_s(directory) -> float:
  """One shuffled pass over an ingested directory through ArrayRecordSource."""
  from vlm_jax.data.sources import arrayrecord  # pylint: disable=g-import-not-at-top
  source = arrayrecord.ArrayRecordSource(storage.glob(storage.join(directory, "*.array_record")))
  order = list(range(len(source)))
  random.Random(0).shuffle(order)
  start = time.perf_counter()
  for index in order:
    source[index]
  return len(order) / (time.perf_counter() - start)


def bench_data(args, root: str, bucket: str) -> None:
  from vlm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from vlm_jax.data import ingest  # pylint: disable=g-import-not-at-top
  from vlm_jax.data.synthetic import sample_data  # pylint: disable=g-import-not-at-top
  sizes = sample_data.SyntheticSizes(train_pairs=args.pairs, validation_pairs=64,
                                     train_docs=64, validation_docs=64, train_interleaved=0,
                                     validation_interleaved=0, shard_size=1000, image_size=256)
  tars = os.path.join(sample_data.ensure_sample_data(root, sizes), "pairs", "train", "*.tar")
  local = os.path.join(root, "ingested")
  ingest.run("img2dataset", tars, local, shard_size=1000)
  remote = f"gs://{bucket}/ingested"
  storage.put_tree(local, remote, last=("dataset.json",))
  for name, directory in (("local", local), ("gcs", remote)):
    print(json.dumps({"array_record_source": name, "records_per_s": round(
        records_per_s(directory))}), flush=True)
  for workers in (int(w) for w in args.workers.split(",")):
    rates = {}
    for name, directory in (("local", local), ("gcs", remote)):
      cfg = config_lib.load_config("configs/simvlm.py:tiny").data
      cfg.mixture, cfg.image_size, cfg.num_workers = directory, 224, workers
      rates[name] = measure(cfg, args.batch, args.seconds)[1]
    print(json.dumps({"pipeline_num_workers": workers, "batch": args.batch,
                      "local_examples_per_s": round(rates["local"], 1),
                      "gcs_examples_per_s": round(rates["gcs"], 1),
                      "gcs_over_local": round(rates["gcs"] / rates["local"], 3)}), flush=True)


def train(args, workdir: str, steps: int, cache: str, data_dir: str) -> dict:
  """Seconds from the start of a vlm-train process to its restored state, its first step
  and its exit."""
  command = [sys.executable, "-m", "vlm_jax.cli.train", "--config", args.config,
             "--workdir", workdir, f"--config.num_train_steps={steps}",
             "--config.batch_size=8", "--config.log_every_steps=1",
             "--config.optimizer.schedule=constant", "--config.optimizer.warmup_steps=1",
             f"--config.data.data_dir={data_dir}", "--num-samples=0"]
  if cache:
    command.append(f"--config.compilation_cache_dir={cache}")
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  start, marks = time.perf_counter(), {}
  proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True, env=env, cwd=REPO)
  for line in proc.stdout:
    if line.startswith("Model FLOPs") and "restored_s" not in marks:
      marks["restored_s"] = time.perf_counter() - start
    if re.match(r"step \d+/", line) and "first_step_s" not in marks:
      marks["first_step_s"] = time.perf_counter() - start
  if proc.wait():
    raise RuntimeError(f"{' '.join(command)} failed with status {proc.returncode}")
  marks["process_s"] = time.perf_counter() - start
  marks["compile_and_first_step_s"] = marks["first_step_s"] - marks["restored_s"]
  return marks


def bench_second_start(args, root: str, bucket: str) -> None:
  from vlm_jax.data.synthetic import sample_data  # pylint: disable=g-import-not-at-top
  data_dir = f"gs://{bucket}/data"
  sample_data.ensure_sample_data(data_dir, sample_data.SyntheticSizes(
      train_pairs=400, validation_pairs=32, train_docs=200, validation_docs=32,
      train_interleaved=0, validation_interleaved=0, shard_size=200, image_size=64))
  caches = {"none": "none", "gcs_workdir": "", "local": os.path.join(root, "jax_cache")}
  workdirs = {name: f"gs://{bucket}/second_start_{name}" for name in caches}
  for name, cache in caches.items():  # the first start: checkpoint (and cache) filled
    train(args, workdirs[name], 2, cache, data_dir)
  starts = {name: [] for name in caches}
  for _ in range(args.starts):
    for name, cache in caches.items():
      # Back to the first start's state: only its step-2 checkpoint.
      for step in storage.listdir(f"{workdirs[name]}/checkpoints"):
        if step != "2":
          storage.rmtree(f"{workdirs[name]}/checkpoints/{step}")
      starts[name].append(train(args, workdirs[name], 4, cache, data_dir))
  for name, runs in starts.items():
    print(json.dumps({"second_start_cache": name, "config": args.config, "starts": len(runs),
                      **{k: round(statistics.median(r[k] for r in runs), 1)
                         for k in ("restored_s", "compile_and_first_step_s", "first_step_s",
                                   "process_s")}}), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--pairs", type=int, default=2000)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--seconds", type=float, default=20.0)
  parser.add_argument("--workers", default="0,2")
  parser.add_argument("--starts", type=int, default=3)
  parser.add_argument("--config", default="configs/simvlm.py:tiny")
  parser.add_argument("--skip", default="", help="data or second_start")
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()
  print(f"load before: {open('/proc/loadavg').read().strip()}", flush=True)
  with LocalGCS(buckets=["bench"]) as gcs, tempfile.TemporaryDirectory() as root:
    os.environ.update(gcs.env)
    if args.skip != "data":
      bench_data(args, root, "bench")
    if args.skip != "second_start":
      bench_second_start(args, root, "bench")
  print(f"load after: {open('/proc/loadavg').read().strip()}", flush=True)


if __name__ == "__main__":
  main()
