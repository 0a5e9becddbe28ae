"""`vlm-data ingest`: source files -> validated, filtered ArrayRecord shards + dataset.json.

Every record is checked the way training will use it (image decodes within the pixel
limit, caption/text non-empty) so bad input is found once, here, and counted; then the
filters (`filters.py`: image size and side ratio, caption length, metadata thresholds,
duplicates) and an optional per-record labeller (`labellers.py`, e.g. Prismer's
experts; `vlm-data experts` is this ingest with a labeller) run. The shards hold only
usable records, written with group_size 1 for cheap random access, plus `statistics.json`
(records in/out by reason, image-side and caption-length histograms, bad records by
kind). A directory written here is a task: set `config.data.mixture` to its path.

Two executors share everything below: `run_local` (one process, files in order) and
`beam.py` (files in parallel on any Beam runner). Records are numbered by
(input file index in sorted order, position in the file); the kept records are written in
that order, `shard_size` per shard, so both executors write the same bytes to the same
shards whatever the parallelism.
"""
import collections
import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import time

from PIL import Image

from vlm_jax import storage
from vlm_jax.data import health, preprocessors, records
from vlm_jax.data.ingest import filters as filters_lib
from vlm_jax.data.ingest import labellers, readers

MANIFEST = records.MANIFEST
STATISTICS = "statistics.json"
SHARD = "{:05d}.array_record"
KINDS = {"img2dataset": "pairs", "img2dataset-tfrecord": "pairs", "text": "text",
         "mmc4": "interleaved", "obelics": "interleaved"}


@dataclasses.dataclass(frozen=True)
class Options:
  format: str  # key of readers.READERS
  shard_size: int = 10_000
  min_similarity: float = 0.24  # MMC4: images matched below this are not read
  max_images: int = 6  # MMC4/OBELICS: per document
  image_tars: str = ""  # MMC4/OBELICS: glob of img2dataset tars holding the images
  max_pixels: int = preprocessors.DEFAULT_MAX_PIXELS
  bad_window: int = 1000
  max_bad_fraction: float = 0.1
  filters: filters_lib.Filters = filters_lib.Filters()
  experts: str = ""  # labellers.make spec; "" = none

  def __post_init__(self):
    if self.format not in readers.READERS:
      raise ValueError(f"format {self.format!r}: expected one of {sorted(readers.READERS)}")
    if self.shard_size < 1:
      raise ValueError(f"shard_size {self.shard_size} < 1 (--shard-size)")


class Filtered(Exception):
  """A usable record that the filters remove (not a bad record)."""


# ----------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------
def _bucket(n: int) -> int:
  """Power-of-two histogram bins: 0, 1, 2-3, 4-7, ... named by their lower bound."""
  return 0 if n <= 0 else 2 ** int(math.log2(n))


class Stats:
  """Counters that add up across files and workers (`merge`), so any executor gets the
  same totals."""
  FIELDS = ("records", "removed", "bad_records", "dropped_images", "image_side",
            "caption_words")

  def __init__(self):
    for field in self.FIELDS:
      setattr(self, field, collections.Counter())

  def merge(self, other):
    for field in self.FIELDS:
      getattr(self, field).update(getattr(other, field))
    return self

  def remove(self, reason):
    self.removed[reason] += 1

  def bad(self, marker: health.Skipped):
    self.remove("bad record")
    self.bad_records[marker.reason.split(":")[0]] += 1

  def output(self, record):
    """Histograms of what is written: shorter image side (every image), words of the
    caption (pairs) or of the whole text (documents)."""
    self.records["out"] += 1
    images = [record["image"]] if record["kind"] == "pairs" else [
        i for i in record.get("images", ()) if i is not None]
    for image in images:
      self.image_side[_bucket(min(Image.open(io.BytesIO(image)).size))] += 1
    texts = [record["text"]] if "text" in record else [t for t in record["texts"] if t]
    self.caption_words[_bucket(sum(len(t.split()) for t in texts))] += 1

  def to_json(self) -> dict:
    histogram = lambda c: {str(k): c[k] for k in sorted(c)}
    return {"records_in": self.records["in"], "records_out": self.records["out"],
            "removed": dict(sorted(self.removed.items())),
            "bad_records": dict(sorted(self.bad_records.items())),
            "dropped_images": dict(sorted(self.dropped_images.items())),
            "image_side_histogram": histogram(self.image_side),
            "caption_words_histogram": histogram(self.caption_words)}


# ----------------------------------------------------------------------------------------
# Per record and per file (both executors)
# ----------------------------------------------------------------------------------------
def _validate(record, options: Options, stats: Stats):
  """Returns the record to keep; raises BadRecord (unusable) or Filtered. Images inside a
  document that are undecodable or filtered out are removed (counted in
  `stats.dropped_images`) rather than losing the document."""
  kind, filters = record["kind"], options.filters
  if kind == "pairs":
    image = preprocessors.decode_image(record["image"], options.max_pixels)
    record["text"] = preprocessors.caption_of(record)
    reason = filters_lib.image_reason(image.size, filters) or filters_lib.reject_reason(
        record, filters)
    if reason:
      raise Filtered(reason)
    return record
  if kind == "text":
    record["text"] = preprocessors.clean_text(record["text"])
    return record
  texts, images, filtered = [], [], 0
  for text, image in zip(record["texts"], record["images"]):
    if image is not None:
      try:
        reason = filters_lib.image_reason(
            preprocessors.decode_image(image, options.max_pixels).size, filters)
      except preprocessors.BadRecord:
        reason = "undecodable image"
      if reason:
        stats.dropped_images[reason] += 1
        filtered += reason != "undecodable image"
        continue
      texts.append(None)
      images.append(image)
    elif text and text.strip():
      texts.append(preprocessors.clean_text(text))
      images.append(None)
  if not any(i is not None for i in images):
    if filtered:
      raise Filtered("document: no image passes the filters")
    raise preprocessors.BadRecord("document has no usable image")
  if not any(t is not None for t in texts):
    raise preprocessors.BadRecord("document has no text")
  record["texts"], record["images"] = texts, images
  return record


def image_lookup(options: Options):
  """MMC4/OBELICS out-of-line images (built once per process: it indexes every tar)."""
  if options.format in ("mmc4", "obelics") and options.image_tars:
    return readers.ImageLookup(storage.glob(options.image_tars))
  return None


def _reader(options: Options, path, lookup):
  kwargs = {}
  if options.format in ("mmc4", "obelics"):
    kwargs = {"image_tars": lookup or (), "max_images": options.max_images}
    if options.format == "mmc4":
      kwargs["min_similarity"] = options.min_similarity
  return readers.READERS[options.format]([path], **kwargs)


def read_file(file_index: int, path: str, options: Options, stats: Stats, lookup=None):
  """Yields ((file_index, position), record) for the records of one input file that are
  valid and pass the per-record filters; counts the rest in `stats`. Raises
  `health.TooManyBadRecords` when the file is mostly bad (a wrong format or path)."""
  monitor = health.BadRecordMonitor(options.bad_window, options.max_bad_fraction,
                                    warn_every_s=10.0)
  if storage.size(path) == 0:  # an interrupted download: a bad record, not a crash
    stream = [health.Skipped(path, "", "zero-byte file")]
  else:
    stream = _reader(options, path, lookup)
  for position, record in enumerate(stream):
    stats.records["in"] += 1
    if isinstance(record, health.Skipped):
      monitor.bad(record)
      stats.bad(record)
      continue
    try:
      record = _validate(record, options, stats)
    except preprocessors.BadRecord as e:
      marker = health.Skipped(record["source"], record["key"], str(e))
      monitor.bad(marker)
      stats.bad(marker)
      continue
    except Filtered as e:
      monitor.ok(record["source"])
      stats.remove(str(e))
      continue
    monitor.ok(record.pop("source"))
    yield (file_index, position), record
  monitor.finish()


def label_record(label, record, stats: Stats):
  """`label(record)` (after dedup, so duplicates are not labelled), or None for a record
  the labeller cannot label: a bad record, counted like the readers' ones."""
  try:
    return label(record)
  except preprocessors.BadRecord as e:
    stats.bad(health.Skipped("", record["key"], str(e)))
    return None


class ShardWriter:
  """Writes records `shard_size` per file, numbering shards from `first_shard`. Each shard
  is written to a local file and appears at its place (gs://: uploaded) when complete."""

  def __init__(self, directory, shard_size, first_shard=0):
    self._directory, self._shard_size = directory, shard_size
    self.shard, self._writer, self._count = first_shard, None, 0
    self._staged = contextlib.ExitStack()

  def write(self, record):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    if self._count % self._shard_size == 0:
      self.close()
      local = self._staged.enter_context(storage.staged_write(
          storage.join(self._directory, SHARD.format(self.shard))))
      self._writer = array_record_module.ArrayRecordWriter(local, "group_size:1")
      self.shard += 1
    self._writer.write(records.encode(record))
    self._count += 1

  def close(self):
    if self._writer:
      self._writer.close()
      self._writer = None
      self._staged.close()


# ----------------------------------------------------------------------------------------
# Output directory (both executors)
# ----------------------------------------------------------------------------------------
def list_inputs(input_glob):
  paths = sorted(storage.abspath(p) for p in storage.glob(input_glob))
  if not paths:
    raise FileNotFoundError(f"no input files match {input_glob!r} (--input)")
  return paths


def start_output(output_dir) -> str:
  """Checks `output_dir` may be replaced; returns an empty staging directory beside it. In
  gs:// (no rename) the output directory itself, emptied manifest first: the manifest,
  written last, is what makes it a dataset."""
  if storage.isdir(output_dir) and storage.listdir(output_dir) and not storage.exists(
      storage.join(output_dir, MANIFEST)):
    raise FileExistsError(f"{output_dir} exists and was not written by ingest; refusing to "
                          "replace it")
  if storage.is_gcs(output_dir):
    if storage.exists(storage.join(output_dir, MANIFEST)):
      storage.remove(storage.join(output_dir, MANIFEST))
    storage.rmtree(output_dir)
    return output_dir
  staging = output_dir.rstrip("/") + ".tmp"
  shutil.rmtree(staging, ignore_errors=True)
  os.makedirs(staging)
  return staging


def _kind(options: Options, paths):
  if options.format == "arrayrecord":  # shards written here before: their manifest says
    return records.read_manifest(os.path.dirname(paths[0]))["kind"]
  return KINDS[options.format]


def write_summary(staging, options: Options, paths, stats: Stats, runner: str):
  """statistics.json and the manifest (the catalog reads its `kind`)."""
  out = stats.records["out"]
  storage.write_atomic(storage.join(staging, STATISTICS), json.dumps(stats.to_json(), indent=2))
  manifest = {"kind": _kind(options, paths), "format": options.format,
              "inputs": list(paths), "records": out,
              "shards": math.ceil(out / options.shard_size),
              "skipped": dict(sorted(stats.bad_records.items())),
              "dropped_images": sum(stats.dropped_images.values()),
              "filters": dataclasses.asdict(options.filters), "experts": options.experts,
              "runner": runner}
  storage.write_atomic(storage.join(staging, MANIFEST), json.dumps(manifest, indent=2))


def finish_output(staging, output_dir, seconds) -> dict:
  manifest = records.read_manifest(staging)
  manifest["seconds"] = round(seconds, 2)
  storage.write_atomic(storage.join(staging, MANIFEST), json.dumps(manifest, indent=2))
  if staging == output_dir:  # gs://: written in place
    return manifest
  shutil.rmtree(output_dir, ignore_errors=True)
  os.rename(staging, output_dir)
  return manifest


# ----------------------------------------------------------------------------------------
# Executors
# ----------------------------------------------------------------------------------------
def run_local(options: Options, input_glob, output_dir) -> dict:
  start, paths = time.time(), list_inputs(input_glob)
  staging = start_output(output_dir)
  stats, seen, lookup = Stats(), set(), image_lookup(options)
  label = labellers.make(options.experts)
  writer = ShardWriter(staging, options.shard_size)
  for file_index, path in enumerate(paths):
    for _, record in read_file(file_index, path, options, stats, lookup):
      keys = filters_lib.dedup_keys(record, options.filters)
      duplicate = next((kind for kind, key in keys if (kind, key) in seen), None)
      seen.update(keys)
      if duplicate:
        stats.remove(filters_lib.duplicate_reason(duplicate))
        continue
      record = label_record(label, record, stats)
      if record is None:
        continue
      stats.output(record)
      writer.write(record)
  writer.close()
  write_summary(staging, options, paths, stats, "local")
  return finish_output(staging, output_dir, time.time() - start)


def read_statistics(directory):
  return json.loads(storage.read_text(storage.join(directory, STATISTICS)))
