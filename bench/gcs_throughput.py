"""gs:// against local disk, on a GCS API served on localhost (fake-gcs-server):

  python bench/gcs_throughput.py [--shards 4] [--records 1000] [--record_kb 16] [--repeats 3]
                                 [--config configs/simvlm.py:tiny] [--starts 3]

1. ArrayRecord records/s from the same shards on local disk and in gs:// (array_record reads
   gs:// itself): through ArrayRecordDataSource, batches of 64 consecutive records
   ("sequential") and of 64 random indices (a shuffled epoch, "random"); and through
   ArrayRecordReader with a 16 MiB read-ahead, shard after shard ("stream"). The server runs
   on this machine, so the gap is the per-request cost of the HTTP path, not the network
   latency or bandwidth of real GCS.
2. The second start of a train job: the time to compile the tiny config's train step
   (bench/train_step.py's set-up) in a fresh process, with no persistent compilation cache,
   with the cache in a local directory, and with the cache in gs://; each cache is filled by
   a first start that is not timed; medians of --starts starts, interleaved.
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

from array_record.python import array_record_module
from array_record.python.array_record_data_source import ArrayRecordDataSource

from vlm_jax import storage
from vlm_jax.gcs_emulator import LocalGCS

BATCH = 64


def write_shards(directory, shards, records, record_bytes):
  rng = random.Random(0)
  paths = []
  for i in range(shards):
    path = os.path.join(directory, f"train-{i:05d}-of-{shards:05d}.array_record")
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for _ in range(records):
      writer.write(rng.randbytes(record_bytes))
    writer.close()
    paths.append(path)
  return paths


def read_source(paths, order: str, seed: int) -> int:
  """Every record once through ArrayRecordDataSource (grain's source), BATCH at a time."""
  source = ArrayRecordDataSource(paths)
  indices = list(range(len(source)))
  if order == "random":
    random.Random(seed).shuffle(indices)
  for i in range(0, len(indices), BATCH):
    source.__getitems__(indices[i:i + BATCH])
  return len(indices)


def read_streams(paths) -> int:
  """Every record once, shard after shard, with a 16 MiB read-ahead (ArrayRecordDataSource
  forces readahead_buffer_size:0, for random access)."""
  count = 0
  for path in paths:
    reader = array_record_module.ArrayRecordReader(path, f"readahead_buffer_size:{16 << 20}")
    for i in range(0, reader.num_records(), BATCH):
      count += len(reader.read(i, min(i + BATCH, reader.num_records())))
    reader.close()
  return count


def records_per_s(paths, order: str, repeats: int) -> float:
  """Median over `repeats` passes of records/s, reading every record once."""
  rates = []
  for repeat in range(repeats):
    start = time.perf_counter()
    count = read_streams(paths) if order == "stream" else read_source(paths, order, repeat)
    rates.append(count / (time.perf_counter() - start))
  return statistics.median(rates)


_COMPILE = """
import json, os, sys, time
start = time.perf_counter()
sys.path.insert(0, os.path.dirname(sys.argv[1]))
import jax
if sys.argv[3]:
  jax.config.update("jax_compilation_cache_dir", sys.argv[3])
from train_step import bench_config
result = bench_config(sys.argv[2], peak=1.0, steps=1)
print(json.dumps({"compile_s": result["compile_s"], "process_s": time.perf_counter() - start}))
"""


def start_job(config: str, cache_dir: str) -> dict:
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": ""}
  bench_train_step = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_step.py")
  out = subprocess.run([sys.executable, "-c", _COMPILE, bench_train_step, config, cache_dir],
                       env=env, check=True, capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shards", type=int, default=4)
  parser.add_argument("--records", type=int, default=1000, help="per shard")
  parser.add_argument("--record_kb", type=int, default=16, help="~ a 224 px JPEG")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--config", default="configs/simvlm.py:tiny")
  parser.add_argument("--starts", type=int, default=3, help="timed second starts per cache")
  args = parser.parse_args()
  print(f"load before: {open('/proc/loadavg').read().strip()}")
  with LocalGCS(buckets=["bench"]) as gcs, tempfile.TemporaryDirectory() as tmp:
    os.environ.update(gcs.env)
    local = write_shards(tmp, args.shards, args.records, args.record_kb * 1024)
    remote = [f"gs://bench/shards/{os.path.basename(p)}" for p in local]
    for src, dst in zip(local, remote):
      storage.copy(src, dst)
    for order in ("sequential", "random", "stream"):
      disk, gcs_rate = (records_per_s(p, order, args.repeats) for p in (local, remote))
      print(json.dumps({"array_record": order, "records": len(local) * args.records,
                        "record_kb": args.record_kb, "local_records_per_s": round(disk),
                        "gcs_records_per_s": round(gcs_rate),
                        "gcs_over_local": round(gcs_rate / disk, 3)}))
    caches = {"none": "", "local": os.path.join(tmp, "jax_cache"), "gcs": "gs://bench/jax_cache"}
    for cache in caches.values():
      if cache:
        start_job(args.config, cache)  # the first start fills the cache
    starts = {name: [] for name in caches}
    for _ in range(args.starts):  # interleaved, so a change in the machine's load hits all
      for name, cache in caches.items():
        starts[name].append(start_job(args.config, cache))
    for name, runs in starts.items():
      print(json.dumps({"second_start_cache": name, "config": args.config, "starts": len(runs),
                        **{k: round(statistics.median(r[k] for r in runs), 1)
                           for k in ("compile_s", "process_s")}}))
  print(f"load after: {open('/proc/loadavg').read().strip()}")


if __name__ == "__main__":
  main()
