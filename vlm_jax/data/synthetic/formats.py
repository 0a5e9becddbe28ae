"""Sample data in the other formats ingest reads, built from the same scenes.

Interleaved documents (MMC4 jsonl, OBELICS parquet) alternate scene descriptions, each
with its picture, and plain sentences; img2dataset's tfrecord output holds the same pairs
as its webdataset output. Used by tests and `vlm-data generate`.
"""
import base64
import io
import json
import tarfile

import numpy as np

from vlm_jax.data.synthetic import scenes

MMC4_SIMILARITY_THRESHOLD = 0.24


def _jpeg(image) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def _document(rng, image_size):
  """[(sentence, jpeg or None)]: 2-4 described scenes among 1-4 plain sentences."""
  items = [(scenes.sample_sentence(rng), None) for _ in range(int(rng.integers(1, 5)))]
  for _ in range(int(rng.integers(2, 5))):
    groups = scenes.sample_scene(rng)
    image = _jpeg(scenes.render_scene(groups, image_size, rng))
    items.insert(int(rng.integers(0, len(items) + 1)),
                 ("the picture shows " + scenes.describe(groups) + ".", image))
  return items


def _tar_add(tar, name, payload):
  info = tarfile.TarInfo(name)
  info.size, info.mtime = len(payload), 0
  tar.addfile(info, io.BytesIO(payload))


def write_mmc4(jsonl_path, num_docs, seed=0, image_size=64, image_tar_path=None):
  """MMC4 documents. Images go inline as `image_base64` (OpenFlamingo's form), or into
  an img2dataset-style tar named by `image_name` when `image_tar_path` is given. A fifth
  of the images match below the usual 0.24 threshold, as in the real data."""
  rng = np.random.default_rng([seed, 4])
  tar = tarfile.open(image_tar_path, "w", format=tarfile.USTAR_FORMAT) if image_tar_path else None
  with open(jsonl_path, "w") as f:
    for number in range(num_docs):
      items = _document(rng, image_size)
      text_list = [sentence for sentence, _ in items]
      image_info, matrix = [], []
      for index, (_, image) in enumerate(items):
        if image is None:
          continue
        name = f"{number:06d}{len(image_info):02d}"
        sim = float(rng.uniform(0.1, 0.23) if rng.random() < 0.2 else rng.uniform(0.25, 0.4))
        info = {"image_name": name + ".jpg", "raw_url": f"synthetic://mmc4/{name}.jpg",
                "face_detections": None, "matched_text_index": index,
                "matched_sim": round(sim, 4)}
        if tar is None:
          info["image_base64"] = base64.b64encode(image).decode("ascii")
        else:
          _tar_add(tar, name + ".jpg", image)
          _tar_add(tar, name + ".json", json.dumps({"url": info["raw_url"], "key": name,
                                                    "status": "success"}).encode())
        image_info.append(info)
        matrix.append([round(sim if j == index else float(rng.uniform(0, 0.2)), 4)
                       for j in range(len(text_list))])
      f.write(json.dumps({"url": f"synthetic://mmc4/doc/{number}", "text_list": text_list,
                          "image_info": image_info, "similarity_matrix": matrix,
                          "could_have_url_duplicate": 0}) + "\n")
  if tar is not None:
    tar.close()


def write_obelics(parquet_path, num_docs, seed=0, image_size=64, image_tar_path=None):
  """OBELICS rows: aligned `texts`/`images`, one non-null per position. Images inline as
  bytes, or as URLs with the pictures in an img2dataset-style tar (as a real download of
  the public URLs would give) when `image_tar_path` is given."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng([seed, 5])
  tar = tarfile.open(image_tar_path, "w", format=tarfile.USTAR_FORMAT) if image_tar_path else None
  rows = []
  for number in range(num_docs):
    texts, images, metadata = [], [], []
    for sentence, image in _document(rng, image_size):
      if image is not None:
        url = f"synthetic://obelics/{number:06d}/{len(images)}.jpg"
        if tar is None:
          images.append(image)
        else:
          key = f"{number:06d}{len(images):03d}"
          _tar_add(tar, key + ".jpg", image)
          _tar_add(tar, key + ".json", json.dumps({"url": url, "key": key}).encode())
          images.append(url)
        texts.append(None)
        metadata.append({"src": url})
      texts.append(sentence)
      images.append(None)
      metadata.append(None)
    rows.append({"images": images, "texts": texts, "metadata": json.dumps(metadata),
                 "general_metadata": json.dumps({"url": f"synthetic://obelics/{number}"})})
  image_type = pa.string() if tar is not None else pa.binary()
  schema = pa.schema([("images", pa.list_(image_type)), ("texts", pa.list_(pa.string())),
                      ("metadata", pa.string()), ("general_metadata", pa.string())])
  pq.write_table(pa.Table.from_pylist(rows, schema=schema), parquet_path)
  if tar is not None:
    tar.close()


def write_img2dataset_tfrecord(path, webdataset_records):
  """img2dataset's tfrecord output: tf.Example with key, jpg, txt + one feature per
  metadata field, from records as WebDatasetSource returns them."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def feature(value):
    if isinstance(value, bytes):
      return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    if isinstance(value, bool) or isinstance(value, int):
      return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))
    if isinstance(value, float):
      return tf.train.Feature(float_list=tf.train.FloatList(value=[value]))
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[str(value or "").encode()]))

  with tf.io.TFRecordWriter(path) as writer:
    for record in webdataset_records:
      meta = json.loads(record["meta"])
      features = {name: feature(value) for name, value in meta.items()}
      features.update(key=feature(record["key"].encode()), jpg=feature(record["image"]),
                      txt=feature(record["text"].encode()))
      writer.write(tf.train.Example(
          features=tf.train.Features(feature=features)).SerializeToString())
