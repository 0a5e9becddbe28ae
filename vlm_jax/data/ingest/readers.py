"""Sequential readers of the source formats `vlm-data ingest` converts.

Each yields normalised records (records.py kinds) or `health.Skipped` markers, one per input
record, in file order. They read whole files front to back, which is what a one-off
conversion wants; training reads the random-access shards the conversion writes.

Formats: img2dataset webdataset tars and tfrecords (pairs), jsonl text, MMC4 jsonl and
OBELICS parquet (interleaved). MMC4 and OBELICS keep images out of line in the public
releases (file names / URLs); `ImageLookup` finds them in tars downloaded with img2dataset,
and MMC4's `image_base64` (OpenFlamingo's converted form) is used when present.
"""
import base64
import binascii
import json
import os

from vlm_jax import storage
from vlm_jax.data.sources import files, webdataset
from vlm_jax.data.health import Skipped


def read_webdataset(paths):
  source = webdataset.WebDatasetSource(paths)
  for index in range(len(source)):
    raw = source[index]
    if raw.get("problem"):
      yield Skipped(raw["source"], raw["key"], raw["problem"])
    else:
      yield {"kind": "pairs", "source": raw["source"], "key": raw["key"],
             "image": raw["image"], "text": raw["text"], "meta": raw["meta"]}


def read_text(paths, field="text"):
  for path in sorted(paths):
    with storage.open(path, "rb") as f:
      for number, line in enumerate(f):
        if not line.strip():
          continue
        key = f"{os.path.basename(path)}:{number}"
        try:
          text = json.loads(line)[field]
          if not isinstance(text, str):
            raise TypeError(f"{field!r} is not a string")
        except (ValueError, KeyError, TypeError) as e:
          yield Skipped(path, key, f"malformed json line: {type(e).__name__}: {e}")
          continue
        yield {"kind": "text", "source": path, "key": key, "text": text}


def _feature_value(feature):
  kind = feature.WhichOneof("kind")
  values = list(getattr(feature, kind).value) if kind else []
  if kind == "bytes_list":
    values = [v.decode("utf-8", "replace") for v in values]
  return values[0] if len(values) == 1 else (values or None)


def read_img2dataset_tfrecord(paths):
  """tf.Example with `key`, `jpg`, `txt` and one feature per metadata field."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for path in sorted(paths):
    number = 0
    # A local copy of a gs:// file: tf.io's GCS client has fixed endpoints (docs/storage.md).
    with storage.local_copy(path) as local:
      try:
        for serialized in tf.data.TFRecordDataset(local).as_numpy_iterator():
          number += 1
          try:
            example = tf.train.Example.FromString(serialized)
          except Exception as e:  # pylint: disable=broad-except  (protobuf DecodeError)
            yield Skipped(path, f"#{number - 1}", f"malformed tf.Example: {e}")
            continue
          features = example.features.feature
          key = _feature_value(features["key"]) if "key" in features else f"#{number - 1}"
          if "jpg" not in features:
            yield Skipped(path, key, "no jpg feature")
            continue
          meta = {name: _feature_value(features[name]) for name in features
                  if name not in ("jpg", "txt")}
          text = _feature_value(features["txt"]) if "txt" in features else None
          yield {"kind": "pairs", "source": path, "key": key,
                 "image": features["jpg"].bytes_list.value[0], "text": text,
                 "meta": json.dumps(meta)}
      except tf.errors.DataLossError as e:  # truncated/corrupt file: the rest is unreadable
        yield Skipped(path, f"#{number}", f"corrupt tfrecord: {e.message.splitlines()[0]}")


class ImageLookup:
  """Images in img2dataset-style tars, found by member file name or by the `url` of the
  record's .json. Only headers and .json members are read up front."""

  def __init__(self, tar_paths):
    self._files = files.LazyFiles()
    self._by_name, self._by_url = {}, {}
    for path in sorted(tar_paths):
      for key, members, problem in webdataset.index_tar(path):
        if problem:
          continue
        image_ext = next((e for e in webdataset.IMAGE_EXTS if e in members), None)
        if image_ext is None:
          continue
        location = (path,) + members[image_ext]
        self._by_name[os.path.basename(key) + "." + image_ext] = location
        self._by_name[os.path.basename(key)] = location
        if "json" in members:
          try:
            url = json.loads(self._files.read(path, *members["json"])).get("url")
          except (ValueError, OSError):
            url = None
          if url:
            self._by_url[url] = location

  def _read(self, location):
    return self._files.read(*location) if location else None

  def by_name(self, name):
    return self._read(self._by_name.get(os.path.basename(name or "")))

  def by_url(self, url):
    return self._read(self._by_url.get(url))


def _lookup(image_tars):
  """`image_tars`: tar paths, or an `ImageLookup` already built (it indexes every tar, so
  callers reading many files build it once)."""
  if isinstance(image_tars, ImageLookup):
    return image_tars
  return ImageLookup(image_tars) if image_tars else None


def _mmc4_document(doc, lookup, min_similarity, max_images):
  """MMC4 -> aligned texts/images; each kept image goes right before its matched sentence
  (OpenFlamingo's placement). Images below `min_similarity` are dropped, then the first
  `max_images` in text order are kept."""
  texts = doc["text_list"]
  if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
    raise ValueError("text_list is not a list of strings")
  kept = []
  for info in doc.get("image_info") or []:
    if float(info.get("matched_sim", 0.0)) < min_similarity:
      continue
    if info.get("image_base64"):
      try:
        image = base64.b64decode(info["image_base64"], validate=True)
      except (binascii.Error, ValueError):
        image = None
    else:
      image = lookup.by_name(info.get("image_name")) if lookup else None
    if image is not None:
      kept.append((int(info["matched_text_index"]), image))
  kept = sorted(kept, key=lambda item: item[0])[:max_images]
  out_texts, out_images = [], []
  for index, sentence in enumerate(texts):
    for _, image in (item for item in kept if item[0] == index):
      out_texts.append(None)
      out_images.append(image)
    out_texts.append(sentence)
    out_images.append(None)
  return out_texts, out_images


def read_mmc4(paths, image_tars=(), min_similarity=0.24, max_images=6):
  lookup = _lookup(image_tars)
  for path in sorted(paths):
    with storage.open(path, "rb") as f:
      for number, line in enumerate(f):
        if not line.strip():
          continue
        key = f"{os.path.basename(path)}:{number}"
        try:
          doc = json.loads(line)
          texts, images = _mmc4_document(doc, lookup, min_similarity, max_images)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
          yield Skipped(path, key, f"malformed json line: {type(e).__name__}: {e}")
          continue
        yield {"kind": "interleaved", "source": path, "key": key, "texts": texts,
               "images": images, "meta": json.dumps({"url": doc.get("url")})}


def _obelics_image(value, lookup):
  if isinstance(value, dict):  # Hugging Face's Image feature: {"bytes", "path"}
    value = value.get("bytes") or value.get("path")
  if isinstance(value, bytes):
    return value
  if isinstance(value, str):  # the public release: a URL, downloaded separately
    return lookup.by_url(value) if lookup else None
  return None


def read_obelics(paths, image_tars=(), max_images=30, batch_rows=256):
  """Rows with aligned `texts`/`images` (exactly one non-null per position)."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  lookup = _lookup(image_tars)
  for path in sorted(paths):
    number = 0
    for batch in pq.ParquetFile(storage.open(path, "rb")).iter_batches(batch_size=batch_rows):
      for row in batch.to_pylist():
        key = f"{os.path.basename(path)}:{number}"
        number += 1
        texts, images = row.get("texts"), row.get("images")
        if texts is None or images is None or len(texts) != len(images) or any(
            (t is None) == (i is None) for t, i in zip(texts, images)):
          yield Skipped(path, key, "misaligned texts/images (need exactly one non-null "
                        "per position)")
          continue
        out_texts, out_images, count = [], [], 0
        for text, image in zip(texts, images):
          if text is not None:
            out_texts.append(text)
            out_images.append(None)
            continue
          data = _obelics_image(image, lookup)
          if data is not None and count < max_images:
            out_texts.append(None)
            out_images.append(data)
            count += 1
        yield {"kind": "interleaved", "source": path, "key": key, "texts": out_texts,
               "images": out_images, "meta": row.get("general_metadata")}


def read_arrayrecord(paths, chunk=256):
  """Shards written by ingest (to label them with experts, or filter them again)."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  from vlm_jax.data import records  # pylint: disable=g-import-not-at-top
  for path in sorted(paths):
    reader = array_record_module.ArrayRecordReader(path)
    try:
      total = reader.num_records()
      for first in range(0, total, chunk):
        for index, data in enumerate(reader.read(list(range(first, min(first + chunk, total)))),
                                     first):
          try:
            record = records.decode(data)
          except ValueError as e:
            yield Skipped(path, f"#{index}", f"unreadable record: {e}")
            continue
          record["source"] = path
          yield record
    finally:
      reader.close()


READERS = {
    "img2dataset": read_webdataset,
    "img2dataset-tfrecord": read_img2dataset_tfrecord,
    "text": read_text,
    "mmc4": read_mmc4,
    "obelics": read_obelics,
    "arrayrecord": read_arrayrecord,
}
