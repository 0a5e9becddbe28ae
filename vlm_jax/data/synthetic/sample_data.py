"""Deterministic sample data in real formats: img2dataset webdataset shards and text jsonl.

The files are written exactly as the real tools write them, so the readers that train on
the sample data are the readers that train on LAION/C4-style data. Generation is seeded
per (split, shard); the validation split uses a different seed from train.

Layout under `<data_dir>/synthetic/`:
  pairs/<split>/00000.tar, 00000.parquet, 00000_stats.json, ...   (img2dataset webdataset)
  text/<split>/00000.jsonl                                         ({"text": ...} per line)
  interleaved/<split>/mmc4.jsonl, obelics.parquet                  (documents with images)
  manifest.json                                                    (what was generated)
"""
import dataclasses
import io
import json
import os
import shutil
import tarfile
import tempfile
import time

import numpy as np

from vlm_jax import storage
from vlm_jax.data.synthetic import formats, scenes

VERSION = 2
SPLIT_SEEDS = {"train": 0, "validation": 1_000_003}
SUBDIR = "synthetic"


@dataclasses.dataclass(frozen=True)
class SyntheticSizes:
  train_pairs: int = 16_000
  validation_pairs: int = 512
  train_docs: int = 8_000
  validation_docs: int = 512
  train_interleaved: int = 200  # per interleaved format
  validation_interleaved: int = 50
  shard_size: int = 4_000
  image_size: int = 64
  text_image_fraction: float = 0.15  # images of rendered words, captioned by the words
  failed_fraction: float = 0.01  # rows img2dataset lists in the parquet but not in the tar
  seed: int = 0


def default_data_dir() -> str:
  return os.environ.get("VLM_JAX_DATA_DIR") or os.path.expanduser("~/.cache/vlm_jax/sample_data")


def synthetic_dir(data_dir: str = "") -> str:
  return storage.join(data_dir or default_data_dir(), SUBDIR)


def _tar_add(tar, name, payload: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  info.mtime = 0  # reproducible bytes
  tar.addfile(info, io.BytesIO(payload))


def _sample_pair(rng, sizes):
  if rng.random() < sizes.text_image_fraction:
    caption = scenes.sample_words(rng)
    image = scenes.render_text(caption, sizes.image_size, rng)
  else:
    groups = scenes.sample_scene(rng)
    caption = scenes.describe(groups)
    image = scenes.render_scene(groups, sizes.image_size, rng)
  return image, caption


def write_img2dataset_shard(directory, shard_id, rows):
  """One img2dataset shard: tar of {key}.jpg/.txt/.json, parquet of all rows, stats.

  `rows` yields dicts with `image` (PIL, or None for a failed download), `caption`, `url`
  and `similarity`, in key order.
  """
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  table, start = [], time.time()
  with tarfile.open(os.path.join(directory, f"{shard_id:05d}.tar"), "w",
                    format=tarfile.USTAR_FORMAT) as tar:
    for index, row in enumerate(rows):
      key = f"{shard_id:05d}{index:04d}"
      image, caption, url = row["image"], row["caption"], row["url"]
      if image is None:
        table.append(dict(url=url, key=key, caption=caption, status="failed_to_download",
                          error_message="synthetic: not downloaded", width=None, height=None,
                          original_width=None, original_height=None, exif=None,
                          similarity=None))
        continue
      jpeg = io.BytesIO()
      image.save(jpeg, format="JPEG", quality=90)
      meta = dict(url=url, key=key, caption=caption, status="success", error_message=None,
                  width=image.width, height=image.height, original_width=image.width,
                  original_height=image.height, exif="{}", similarity=row["similarity"])
      table.append(meta)
      _tar_add(tar, f"{key}.jpg", jpeg.getvalue())
      _tar_add(tar, f"{key}.txt", caption.encode())
      _tar_add(tar, f"{key}.json", json.dumps(meta).encode())
  pq.write_table(pa.Table.from_pylist(table),
                 os.path.join(directory, f"{shard_id:05d}.parquet"))
  successes = sum(r["status"] == "success" for r in table)
  stats = dict(count=len(table), successes=successes, failed_to_download=len(table) - successes,
               failed_to_resize=0, duration=time.time() - start, start_time=start,
               end_time=time.time(),
               status_dict={"success": successes,
                            "synthetic: not downloaded": len(table) - successes})
  with open(os.path.join(directory, f"{shard_id:05d}_stats.json"), "w") as f:
    json.dump(stats, f, indent=2)


def write_pairs_shard(directory, shard_id, count, rng, sizes):
  def rows():
    for index in range(count):
      image, caption = _sample_pair(rng, sizes)
      url = f"synthetic://scene/{shard_id:05d}{index:04d}"
      if rng.random() < sizes.failed_fraction:
        yield dict(image=None, caption=caption, url=url, similarity=None)
      else:
        yield dict(image=image, caption=caption, url=url,
                   similarity=round(float(rng.uniform(0.28, 0.45)), 4))
  write_img2dataset_shard(directory, shard_id, rows())


def write_text_shard(path, count, rng):
  with open(path, "w") as f:
    for _ in range(count):
      f.write(json.dumps({"text": scenes.sample_document(rng)}) + "\n")


def _rng(sizes, split, kind, shard):
  return np.random.default_rng([sizes.seed, SPLIT_SEEDS[split], kind, shard])


def generate(output_dir: str, sizes: SyntheticSizes = SyntheticSizes()) -> dict:
  """Writes every split into `output_dir` (which must not exist yet)."""
  start = time.time()
  plan = {"train": (sizes.train_pairs, sizes.train_docs, sizes.train_interleaved),
          "validation": (sizes.validation_pairs, sizes.validation_docs,
                         sizes.validation_interleaved)}
  for split, (num_pairs, num_docs, num_interleaved) in plan.items():
    pairs_dir = os.path.join(output_dir, "pairs", split)
    text_dir = os.path.join(output_dir, "text", split)
    os.makedirs(pairs_dir)
    os.makedirs(text_dir)
    for shard, first in enumerate(range(0, num_pairs, sizes.shard_size)):
      write_pairs_shard(pairs_dir, shard, min(sizes.shard_size, num_pairs - first),
                        _rng(sizes, split, 0, shard), sizes)
    write_text_shard(os.path.join(text_dir, "00000.jsonl"), num_docs,
                     _rng(sizes, split, 1, 0))
    interleaved_dir = os.path.join(output_dir, "interleaved", split)
    os.makedirs(interleaved_dir)
    seed = sizes.seed + SPLIT_SEEDS[split]
    formats.write_mmc4(os.path.join(interleaved_dir, "mmc4.jsonl"), num_interleaved,
                                 seed, sizes.image_size)
    formats.write_obelics(os.path.join(interleaved_dir, "obelics.parquet"),
                                    num_interleaved, seed, sizes.image_size)
  manifest = dict(version=VERSION, sizes=dataclasses.asdict(sizes),
                  seconds=round(time.time() - start, 2))
  with open(os.path.join(output_dir, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=2)
  return manifest


def is_complete(directory: str, version: int = VERSION) -> bool:
  try:
    return json.loads(storage.read_text(storage.join(directory, "manifest.json")))[
        "version"] == version
  except (OSError, ValueError, KeyError):
    return False


def ensure_generated(target: str, version: int, generate_fn) -> str:
  """Returns `target`, first running `generate_fn(path)` (which writes `manifest.json` with
  `version`) if `target` is missing or of another version.

  Concurrent callers (several processes of one job) are safe: each writes a private temp
  dir and renames it into place; a rename that loses the race is discarded. In gs:// (no
  rename) each uploads the same files, `manifest.json` last.
  """
  if is_complete(target, version):
    return target
  if storage.is_gcs(target):
    with tempfile.TemporaryDirectory(prefix="vlm_jax_generate_") as staging:
      generate_fn(os.path.join(staging, "out"))
      if is_complete(target, version):  # another process finished meanwhile
        return target
      if storage.exists(storage.join(target, "manifest.json")):
        storage.rmtree(target)  # an older version
      storage.put_tree(os.path.join(staging, "out"), target, last=("manifest.json",))
    return target
  parent = os.path.dirname(target)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}-tmp-", dir=parent)
  try:
    generate_fn(os.path.join(staging, "out"))
    if os.path.isdir(target) and not is_complete(target, version):
      shutil.rmtree(target, ignore_errors=True)  # an older version or an aborted copy
    try:
      os.rename(os.path.join(staging, "out"), target)
    except OSError:
      if not is_complete(target, version):
        raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return target


def ensure_sample_data(data_dir: str = "", sizes: SyntheticSizes = SyntheticSizes()) -> str:
  """Returns `<data_dir>/synthetic`, generating it first if missing."""
  return ensure_generated(synthetic_dir(data_dir), VERSION, lambda out: generate(out, sizes))
