"""`vlm-data inspect`: what a task, mixture or directory of shards actually contains.

For a catalog task or mixture: the first training examples as the model sees them (prefix
| target text, image statistics) and, for a mixture, the realised proportions of its tasks
over the first N examples of the stream next to the declared rates. For a directory: the
records of whatever it holds (ingested ArrayRecord, webdataset tars, jsonl, parquet).
"""
import collections
import glob
import os

from vlm_jax.data import catalog, defaults, pipeline, sources
from vlm_jax.data.vocab import Vocab


def _describe(value):
  if isinstance(value, bytes):
    return f"<{len(value)} bytes>"
  if isinstance(value, list):
    return "[" + ", ".join(_describe(v) for v in value) + "]"
  if isinstance(value, str) and len(value) > 200:
    return repr(value[:200] + "...")
  return repr(value)


def _line(record):
  return "- " + "\n  ".join(f"{k}: {_describe(v)}" for k, v in record.items())


def _directory_source(path):
  """A random-access source over a directory, chosen by the files it holds."""
  for pattern, make in (("*.array_record", sources.ArrayRecordSource),
                        ("*.tar", sources.WebDatasetSource),
                        ("*.jsonl", sources.JsonlTextSource)):
    paths = sorted(glob.glob(os.path.join(path, pattern)))
    if paths:
      return make(paths)
  raise FileNotFoundError(f"{path}: no .array_record, .tar or .jsonl files")


def inspect_directory(path, num, out=print):
  if glob.glob(os.path.join(path, "*.parquet")) and not glob.glob(os.path.join(path, "*.tar")):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    table = pq.ParquetFile(sorted(glob.glob(os.path.join(path, "*.parquet")))[0])
    out(f"{path}: parquet, {table.metadata.num_rows} rows in the first file")
    for row in next(table.iter_batches(batch_size=num)).to_pylist()[:num]:
      out(_line(row))
    return
  source = _directory_source(path)
  out(f"{path}: {source!r}")
  for index in range(min(num, len(source))):
    out(_line(source[index]))


def inspect_stream(name, data_dir="", split="train", num=3, mixture_examples=2000, out=print):
  cfg = defaults.default_data_config()
  cfg.data_dir, cfg.mixture = data_dir, name
  mixture = catalog.resolve(name)
  vocab = Vocab(cfg.vocab_path)
  it = pipeline.make_train_iterator(cfg, global_batch_size=num, seed=0, split=split,
                                    process_index=0, process_count=1)
  batch = next(it)
  for i in range(num):
    images = batch["images"][i]
    out(f"[{i}] image_mask={batch['image_mask'][i, 0]:.0f} "
        f"pixels mean={images.mean():+.3f} std={images.std():.3f} | prefix: "
        f"{vocab.decode(batch['prefix_tokens'][i])!r} | target: "
        f"{vocab.decode(batch['targets'][i])!r}")
  it.close()
  if len(mixture.rates) > 1:
    records = pipeline.mixed_records(cfg, seed=0, split=split)
    counts = collections.Counter(records[i][0].name for i in range(mixture_examples))
    out(f"realised proportions over {mixture_examples} examples:")
    for task, rate in mixture.rates:
      out(f"  {task:30s} rate {rate:.3f}  realised {counts[task] / mixture_examples:.3f}")


def run(name, data_dir="", split="train", num=3, mixture_examples=2000, out=print):
  if os.path.isdir(name):
    inspect_directory(name, num, out)
    ingested = os.path.isfile(os.path.join(name, catalog.INGEST_MANIFEST))
    # Ingested pairs/text also show as training examples; interleaved documents wait for
    # the Flamingo converter.
    if not ingested or catalog.task_from_directory(name).kind not in ("pairs", "text"):
      return
  inspect_stream(name, data_dir, split, num, mixture_examples, out)
