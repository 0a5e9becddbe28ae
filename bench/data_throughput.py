"""Examples/s of the SimVLM data pipeline at 224 px with 0, 1 and 2 grain workers, or
(--sources) the same pairs read from each kind of source.

  python bench/data_throughput.py [--pairs 2000] [--batch 32] [--seconds 10]
  python bench/data_throughput.py --sources arrayrecord,tfds,seqio [--workers 0]

Generates 256-px sample pairs once (webdataset, as img2dataset writes them) in a temp dir,
then times the full path: read, JPEG decode, resize to 224, normalise, tokenise, PrefixLM
convert, mix with text (workers mode), batch. The first batches (worker start-up) are
excluded. --sources reads the same pairs as an ingested ArrayRecord directory, a TFDS
dataset in the ArrayRecord format (`tfds:`, random access) and a seqio Task over the same
dataset prepared as tfrecord (a tf.data stream; built by the TFDS builder below, no
download), and times how fast a seqio stream replays to a resume position.
"""
import argparse
import io
import json
import os
import tarfile
import tempfile
import time

from absl import flags

TASKS_MODULE = """import seqio
from vlm_jax.data import vocab
seqio.TaskRegistry.add(
    "bench_pairs", source=seqio.TfdsDataSource("vlm_bench_pairs:1.0.0", tfds_data_dir={dir!r}),
    preprocessors=[seqio.preprocessors.tokenize],
    output_features={{"text": seqio.Feature(seqio.SentencePieceVocabulary(vocab.resolve_path()))}})
"""


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


def _pairs(tars):
  """(jpeg bytes, caption) of every pair in img2dataset tars."""
  for path in tars:
    with tarfile.open(path) as tar:
      members = {m.name: m for m in tar.getmembers()}
      for name in sorted(n for n in members if n.endswith(".jpg")):
        caption = tar.extractfile(members[name[:-4] + ".txt"]).read().decode()
        yield tar.extractfile(members[name]).read(), caption


def _tfds_pairs(root, tars):
  """The pairs as the TFDS dataset vlm_bench_pairs, in ArrayRecord and tfrecord formats."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class VlmBenchPairs(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(encoding_format="jpeg"), "text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for index, (jpeg, caption) in enumerate(_pairs(tars)):
        yield index, {"image": io.BytesIO(jpeg), "text": caption}

  for fmt in ("array_record", "tfrecord"):
    VlmBenchPairs(data_dir=os.path.join(root, fmt), file_format=fmt).download_and_prepare()
  with open(os.path.join(root, "bench_tasks.py"), "w") as f:
    f.write(TASKS_MODULE.format(dir=os.path.join(root, "tfrecord")))


def measure_sources(args, root):
  """examples/s of each source kind (same pairs, SimVLM processor), and the seqio replay
  rate (positions per second a resumed stream skips through)."""
  from vlm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from vlm_jax.data import catalog, ingest, mixture  # pylint: disable=g-import-not-at-top
  tars = sorted(os.path.join(root, "synthetic", "pairs", "train", n) for n in os.listdir(
      os.path.join(root, "synthetic", "pairs", "train")) if n.endswith(".tar"))
  sources = os.path.join(root, "sources")
  if not os.path.isdir(sources):
    start = time.perf_counter()
    ingest.run("img2dataset", os.path.join(root, "synthetic", "pairs", "train", "*.tar"),
               os.path.join(sources, "ingested"))
    _tfds_pairs(sources, tars)
    print(f"sources written in {time.perf_counter() - start:.1f} s ({sources})")
  mixtures = {"arrayrecord": os.path.join(sources, "ingested"),
              "tfds": "tfds:vlm_bench_pairs:1.0.0", "seqio": "bench_pairs"}
  results = []
  for name in args.sources.split(","):
    cfg = config_lib.load_config("configs/simvlm.py:tiny").data
    cfg.image_size, cfg.num_workers = 224, int(args.workers.split(",")[0])
    cfg.mixture, cfg.tfds_data_dir = mixtures[name], os.path.join(sources, "array_record")
    cfg.tasks_module = os.path.join(sources, "bench_tasks.py")
    first, rate = measure(cfg, args.batch, args.seconds)
    results.append({"source": name, "examples_per_s": round(rate, 1),
                    "first_batches_s": round(first, 2), "num_workers": cfg.num_workers,
                    "image_size": 224, "batch": args.batch})
    print(json.dumps(results[-1]))
    if name == "seqio":  # a resumed stream: a fresh reader asked for a far position
      (spec, _), = mixture.resolve(cfg, "simvlm").tasks
      stream = catalog.make_source(spec, "", "train", seed=0, shuffle=True)
      start = time.perf_counter()
      stream[args.replay]
      seconds = time.perf_counter() - start
      print(json.dumps({"source": "seqio replay", "positions": stream.replayed,
                        "positions_per_s": round(stream.replayed / seconds, 1)}))


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--pairs", type=int, default=2000)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--seconds", type=float, default=10.0)
  parser.add_argument("--workers", default="0,1,2")
  parser.add_argument("--sources", default="", help="e.g. arrayrecord,tfds,seqio: compare "
                      "the same pairs from each kind of source (first of --workers)")
  parser.add_argument("--replay", type=int, default=5000,
                      help="--sources seqio: the position a resumed stream replays to")
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
  if args.sources:
    measure_sources(args, root)
    return

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
