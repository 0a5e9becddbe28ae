"""Random-access interleaved documents (MMC4 jsonl, OBELICS parquet) for the grain pipeline.

Neither format can be read by index cheaply (a parquet row group or a jsonl line with
inline base64 images must be parsed whole), and both need the same cleaning `vlm-data
ingest` does (MMC4 similarity threshold, image cap, undecodable images dropped). So a
catalog task in these formats reads an ArrayRecord copy written by `ingest.run` on first
use, next to the input in `.ingested/<file name>/` (atomic: a private directory renamed
into place; a process that loses the race uses the winner's copy; in gs:// the shards are
uploaded before the manifest that makes them a copy). Big real datasets
should be ingested once with `vlm-data ingest` and named by directory instead.

Records are `{"kind": "interleaved", "texts": [...], "images": [...], "key", "meta"}`
(records.py), aligned lists with one non-null per position.
"""
import os
import shutil
import tempfile

from vlm_jax import storage
from vlm_jax.data import ingest, records
from vlm_jax.data.sources import arrayrecord

CACHE_SUBDIR = ".ingested"


def ingested_copy(path: str, fmt: str) -> str:
  """The directory of ArrayRecord shards holding `path` ingested as `fmt`, made if missing."""
  target = storage.join(os.path.dirname(storage.abspath(path)), CACHE_SUBDIR,
                        os.path.basename(path))
  if storage.exists(storage.join(target, records.MANIFEST)):
    return target
  if storage.is_gcs(target):  # no rename: every process uploads the same shards, manifest last
    with tempfile.TemporaryDirectory(prefix="vlm_jax_ingest_") as staging:
      ingest.run(fmt, path, os.path.join(staging, "out"))
      storage.put_tree(os.path.join(staging, "out"), target, last=(records.MANIFEST,))
    return target
  os.makedirs(os.path.dirname(target), exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(target))
  output = os.path.join(staging, "out")
  try:
    ingest.run(fmt, path, output)
    try:
      os.rename(output, target)
    except OSError:
      if not os.path.isfile(os.path.join(target, records.MANIFEST)):
        raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return target


class _IngestedSource(arrayrecord.ArrayRecordSource):
  FORMAT = ""

  def __init__(self, paths):
    if not paths:
      raise FileNotFoundError(f"{type(self).__name__}: no {self.FORMAT} files given.")
    shards = []
    for path in sorted(paths):
      directory = ingested_copy(path, self.FORMAT)
      shards += sorted(storage.join(directory, name) for name in storage.listdir(directory)
                       if name.endswith(".array_record"))
    super().__init__(shards)


class Mmc4Source(_IngestedSource):
  FORMAT = "mmc4"


class ObelicsSource(_IngestedSource):
  FORMAT = "obelics"
