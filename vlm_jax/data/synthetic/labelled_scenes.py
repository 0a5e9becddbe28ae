"""Synthetic scenes labelled by what the generator knows (`experts.SceneTruth`): the
`prismer_scenes` sample task. All six experts, 64 px, 1,500 train / 128 validation examples
in `<data_dir>/synthetic_experts/<split>` as ingested ArrayRecord shards, generated on first
use (atomically). The 16k sample pairs are not labelled: their truth is not stored, and
labelling them all would cost more than the small set needs.
"""
import io
import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

from vlm_jax import storage
from vlm_jax.data import records
from vlm_jax.data.ingest import experts
from vlm_jax.data.ingest import local as ingest
from vlm_jax.data.synthetic import sample_data, scenes

SUBDIR = "synthetic_experts"
VERSION = 2
SIZES = {"train": 1500, "validation": 128}
IMAGE_SIZE = 64


def _copy_rng(rng):
  copy = np.random.default_rng()
  copy.bit_generator.state = rng.bit_generator.state
  return copy


def render_scene_with_truth(groups, size, rng):
  """`scenes.render_scene`'s image, and its instances replayed from the same random draws."""
  replay = _copy_rng(rng)
  image = scenes.render_scene(groups, size, rng)
  canvas = Image.new("L", (size, size), experts.BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  replay.integers(235, 256)  # the background shade
  classes = []
  for shape, _, x, y, r in scenes.shape_placements(groups, size, replay):
    scenes.draw_shape(draw, shape, x, y, r, len(classes))  # the class index as the fill
    classes.append(shape)
  return image, experts.SceneTruth(np.asarray(canvas, np.uint8), classes, [])


def render_text_with_truth(text, size, rng):
  """`scenes.render_text`'s image; its words are instances (class 'text') with boxes."""
  replay = _copy_rng(rng)
  image = scenes.render_text(text, size, rng)
  font = scenes._FONTS[max(8, size // 6)]  # pylint: disable=protected-access
  font_size = max(8, size // 6)
  # The ink exactly as render_text draws it (same calls, anti-aliased), then each ink pixel
  # takes the id of the word whose horizontal span on its line holds it.
  ink = Image.new("L", (size, size), 0)
  draw = ImageDraw.Draw(ink)
  replay.integers(225, 256)
  lines = [text] if draw.textlength(text, font=font) < size - 4 else text.split()
  top = (size - len(lines) * (font_size + 2)) / 2 + replay.uniform(-2, 2)
  owner = np.full((size, size), experts.BACKGROUND, np.uint8)
  classes = []
  for i, line in enumerate(lines):
    left = max(1, (size - draw.textlength(line, font=font)) / 2 + replay.uniform(-2, 2))
    y = top + i * (font_size + 2)
    draw.text((left, y), line, fill=255, font=font)
    rows = slice(max(0, int(y)), max(0, int(np.ceil(y + font_size + 2))))
    offset = 0
    for word in line.split(" "):
      x0 = left + draw.textlength(line[:offset], font=font)
      x1 = left + draw.textlength(line[:offset + len(word)], font=font)
      owner[rows, max(0, int(x0) - 1):int(np.ceil(x1)) + 1] = len(classes)
      classes.append(word)
      offset += len(word) + 1
  instances = np.where(np.asarray(ink) > 96, owner, experts.BACKGROUND).astype(np.uint8)
  words = []
  for i, word in enumerate(classes):  # a word's box: the bounding box of its ink
    ys, xs = np.nonzero(instances == i)
    if len(xs):
      words.append((word, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)))
  return image, experts.SceneTruth(instances, ["text"] * len(classes), words)


def sample_scene_with_truth(rng, size, text_fraction=0.15):
  """(PIL image, caption, SceneTruth) like `sample_data._sample_pair`."""
  if rng.random() < text_fraction:
    caption = scenes.sample_words(rng)
    image, truth = render_text_with_truth(caption, size, rng)
  else:
    groups = scenes.sample_scene(rng)
    caption = scenes.describe(groups)
    image, truth = render_scene_with_truth(groups, size, rng)
  return image, caption, truth


def _scenes_complete(directory) -> bool:
  try:
    return json.loads(storage.read_text(storage.join(directory, records.MANIFEST))).get(
        "scenes_version") == VERSION
  except (OSError, ValueError):
    return False


def ensure(data_dir: str, split: str) -> str:
  """`<data_dir>/synthetic_experts/<split>`, generated first if missing. Concurrent callers
  each write a private staging directory; the rename that loses the race is discarded."""
  if split not in SIZES:
    raise ValueError(f"labelled scenes have splits {sorted(SIZES)}, not {split!r}")
  target = storage.join(data_dir or sample_data.default_data_dir(), SUBDIR, split)
  if _scenes_complete(target):
    return target
  rng = np.random.default_rng([7, sample_data.SPLIT_SEEDS[split]])

  def stream():
    for index in range(SIZES[split]):
      image, caption, truth = sample_scene_with_truth(rng, IMAGE_SIZE)
      labels = experts.label_image(np.asarray(image, np.uint8), experts.ALL_EXPERTS, truth)
      yield _labelled_record(f"{index:06d}", caption, _jpeg(image), labels)

  if storage.is_gcs(target):  # no rename: every caller uploads the same shards, manifest last
    with tempfile.TemporaryDirectory(prefix="vlm_jax_scenes_") as staging:
      _write_scenes(stream(), os.path.join(staging, "out"), split)
      storage.put_tree(os.path.join(staging, "out"), target, last=(records.MANIFEST,))
    return target
  staging = target + f".{os.getpid()}.tmp"
  _write_scenes(stream(), staging, split)
  if os.path.isdir(target) and not _scenes_complete(target):
    shutil.rmtree(target, ignore_errors=True)  # an older version
  try:
    os.rename(staging, target)
  except OSError:
    shutil.rmtree(staging, ignore_errors=True)
    if not _scenes_complete(target):
      raise
  return target


def _labelled_record(key, caption, image_bytes, labels) -> dict:
  header, blobs = experts.encode_labels(labels)  # as `labellers.expert_maps` stores them
  return {"kind": "pairs", "key": key, "text": caption, "image": image_bytes,
          "images": blobs, "experts": header}


def _write_scenes(stream, directory, split):
  shutil.rmtree(directory, ignore_errors=True)
  os.makedirs(directory)
  writer, count = ingest.ShardWriter(directory, 10_000), 0
  for record in stream:
    writer.write(record)
    count += 1
  writer.close()
  manifest = {"kind": "pairs", "format": "experts", "experts": list(experts.ALL_EXPERTS),
              "records": count, "scenes_version": VERSION, "split": split}
  with open(os.path.join(directory, records.MANIFEST), "w") as f:
    json.dump(manifest, f, indent=2)


def _jpeg(image: Image.Image) -> bytes:
  out = io.BytesIO()
  image.save(out, format="JPEG", quality=90)
  return out.getvalue()
