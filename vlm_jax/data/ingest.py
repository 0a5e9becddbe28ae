"""`vlm-data ingest`: source files -> validated ArrayRecord shards + dataset.json.

Every record is checked the way training will use it (image decodes within the pixel
limit, caption/text non-empty) so bad input is found once, here, and counted in the
manifest; the shards then hold only usable records, written with group_size 1 for cheap
random access. A directory written here is a task: set `config.data.mixture` to its path.
"""
import glob
import json
import os
import shutil
import time

from vlm_jax.data import health, preprocessors, records, streams

MANIFEST = "dataset.json"
_SHARD = "{:05d}.array_record"


def _validate(record, max_pixels, dropped_images):
  """Returns the record to write; raises BadRecord. Undecodable images inside a document
  are removed (counted in `dropped_images`, a one-element list) rather than losing the
  document."""
  kind = record["kind"]
  if kind == "pairs":
    preprocessors.decode_image(record["image"], max_pixels)
    record["text"] = preprocessors.caption_of(record)
    return record
  if kind == "text":
    record["text"] = preprocessors.clean_text(record["text"])
    return record
  texts, images = [], []
  for text, image in zip(record["texts"], record["images"]):
    if image is not None:
      try:
        preprocessors.decode_image(image, max_pixels)
      except preprocessors.BadRecord:
        dropped_images[0] += 1
        continue
      texts.append(None)
      images.append(image)
    elif text and text.strip():
      texts.append(preprocessors.clean_text(text))
      images.append(None)
  if not any(i is not None for i in images):
    raise preprocessors.BadRecord("document has no usable image")
  if not any(t is not None for t in texts):
    raise preprocessors.BadRecord("document has no text")
  record["texts"], record["images"] = texts, images
  return record


def run(fmt, input_glob, output_dir, *, shard_size=10_000, min_similarity=0.24,
        max_images=6, image_tars="", max_pixels=preprocessors.DEFAULT_MAX_PIXELS,
        bad_window=1000, max_bad_fraction=0.1) -> dict:
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  paths = sorted(glob.glob(input_glob))
  if not paths:
    raise FileNotFoundError(f"no input files match {input_glob!r}")
  kwargs = {}
  if fmt in ("mmc4", "obelics"):
    kwargs = {"image_tars": sorted(glob.glob(image_tars)) if image_tars else (),
              "max_images": max_images}
    if fmt == "mmc4":
      kwargs["min_similarity"] = min_similarity
  monitor = health.BadRecordMonitor(bad_window, max_bad_fraction, warn_every_s=10.0)
  # A zero-byte file (an interrupted download) is a bad record, not a parser crash.
  for path in paths:
    if os.path.getsize(path) == 0:
      monitor.bad(health.Skipped(path, "", "zero-byte file"))
  paths = [p for p in paths if os.path.getsize(p) > 0]
  stream = streams.READERS[fmt](paths, **kwargs) if paths else iter(())

  if os.path.isdir(output_dir) and os.listdir(output_dir) and not os.path.isfile(
      os.path.join(output_dir, MANIFEST)):
    raise FileExistsError(f"{output_dir} exists and was not written by ingest; refusing to "
                          "replace it")
  staging = output_dir.rstrip("/") + ".tmp"
  shutil.rmtree(staging, ignore_errors=True)
  os.makedirs(staging)
  start, written, dropped_images, shards, kind = time.time(), 0, [0], 0, None
  writer = None
  for record in stream:
    if isinstance(record, health.Skipped):
      monitor.bad(record)
      continue
    try:
      record = _validate(record, max_pixels, dropped_images)
    except preprocessors.BadRecord as e:
      monitor.bad(health.Skipped(record["source"], record["key"], str(e)))
      continue
    monitor.ok(record.pop("source"))
    kind = record["kind"]
    if written % shard_size == 0:
      if writer:
        writer.close()
      writer = array_record_module.ArrayRecordWriter(
          os.path.join(staging, _SHARD.format(shards)), "group_size:1")
      shards += 1
    writer.write(records.encode(record))
    written += 1
  if writer:
    writer.close()
  monitor.finish()
  manifest = {"kind": kind, "format": fmt, "inputs": paths, "records": written,
              "shards": shards, "skipped": dict(monitor.skipped),
              "dropped_images": dropped_images[0], "seconds": round(time.time() - start, 2)}
  with open(os.path.join(staging, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=2)
  shutil.rmtree(output_dir, ignore_errors=True)
  os.rename(staging, output_dir)
  return manifest


def read_manifest(directory):
  with open(os.path.join(directory, MANIFEST)) as f:
    return json.load(f)
