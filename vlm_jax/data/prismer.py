"""Prismer data: the labelling stage, the labelled synthetic scenes, and the converter.

Labelling (`vlm-data experts`) is the ingest (`ingest.py`, local or Beam) with Prismer's
labeller (`labellers.prismer`): it runs expert functions (`experts.EXPERTS`) over a
dataset's images, or reads labels computed elsewhere (`--labels DIR`, the reference's
`<expert>/<key>.png` layout), and writes ArrayRecord shards plus `dataset.json`, so the
output directory is a task by its path (`config.data.mixture = DIR`). A record is an
image-text pair whose `images` are the experts' PNGs and whose `experts` header lists, in
the same order, each expert's name and, for label maps, the name of every id.

`prismer_scenes` (catalog task): synthetic scenes labelled with what the generator knows
(`experts.SceneTruth`): all six experts, 64 px, 1,500 train / 128 validation examples in
`<data_dir>/synthetic_experts/<split>`, generated on first use (atomically). The 16k
sample pairs are not labelled: their truth is not stored, and labelling them all would
cost more than the small set needs.

Converter (`config.data.converter = 'prismer'`), one example (the pipeline stacks B):

    images                          [1, S, S, 3] f32  pixels in [-1, 1] (S = image_size)
    expert_<name>                   [E, E, C] f32     E = expert_size; dense maps min-max
                                                      scaled to [-1, 1]; label maps as
                                                      `LabelTable` vectors (C = label_dim)
    expert_obj_detection_instances  [E, E] i32        instance ids (255 = background)
    tokens / targets / loss_mask    [T]               BOS + caption / caption + EOS / 1 on
                                                      real targets (T = text_length)
    loss_weight                     [] f32

Maps are resized with nearest neighbours (ids must stay ids), as the reference does.
"""
import glob
import io
import json
import os
import shutil

import numpy as np
from PIL import Image

from vlm_jax.data import catalog, experts, ingest, preprocessors, sources, synthetic
from vlm_jax.data import processor as processor_lib
from vlm_jax.data.vocab import BOS_ID, EOS_ID, PAD_ID, Vocab

MANIFEST = catalog.INGEST_MANIFEST
SCENES_SUBDIR = "synthetic_experts"
SCENES_VERSION = 2
SCENES_SIZES = {"train": 1500, "validation": 128}
SCENES_IMAGE_SIZE = 64


# ----------------------------------------------------------------------------------------
# Labelled synthetic scenes (generated on first use)
# ----------------------------------------------------------------------------------------
def _scenes_complete(directory) -> bool:
  try:
    with open(os.path.join(directory, MANIFEST)) as f:
      return json.load(f).get("scenes_version") == SCENES_VERSION
  except (OSError, ValueError):
    return False


def ensure_labelled_scenes(data_dir: str, split: str) -> str:
  """`<data_dir>/synthetic_experts/<split>`, generated first if missing. Concurrent callers
  each write a private staging directory; the rename that loses the race is discarded."""
  if split not in SCENES_SIZES:
    raise ValueError(f"labelled scenes have splits {sorted(SCENES_SIZES)}, not {split!r}")
  target = os.path.join(data_dir or synthetic.default_data_dir(), SCENES_SUBDIR, split)
  if _scenes_complete(target):
    return target
  rng = np.random.default_rng([7, synthetic.SPLIT_SEEDS[split]])

  def stream():
    for index in range(SCENES_SIZES[split]):
      image, caption, truth = experts.sample_scene_with_truth(rng, SCENES_IMAGE_SIZE)
      labels = experts.label_image(np.asarray(image, np.uint8), experts.ALL_EXPERTS, truth)
      yield _labelled_record(f"{index:06d}", caption, _jpeg(image), labels)

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
  header, blobs = experts.encode_labels(labels)  # as `labellers.prismer` stores them
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
              "records": count, "scenes_version": SCENES_VERSION, "split": split}
  with open(os.path.join(directory, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=2)


def _jpeg(image: Image.Image) -> bytes:
  out = io.BytesIO()
  image.save(out, format="JPEG", quality=90)
  return out.getvalue()


class LabelledScenesSource(sources.ArrayRecordSource):
  """Reader of the `prismer_scenes` task. The catalog hands a reader only the paths its
  pattern matched, so the task's pattern names the sample set's `pairs/<split>` directory
  (which the catalog generates when missing); from it this reader takes the data dir and
  the split, and reads (generating on first use) the labelled scenes of that split."""

  def __init__(self, paths):
    split_dir = os.path.normpath(paths[0])
    split = os.path.basename(split_dir)
    data_dir = os.path.dirname(os.path.dirname(os.path.dirname(split_dir)))
    directory = ensure_labelled_scenes(data_dir, split)
    super().__init__(glob.glob(os.path.join(directory, "*.array_record")))


def register_catalog():
  catalog.READERS.setdefault("prismer_scenes", LabelledScenesSource)
  if "prismer_scenes" not in catalog.TASKS:
    catalog.add_task(catalog.TaskSpec("prismer_scenes", "pairs", "prismer_scenes",
                                      f"{synthetic.SUBDIR}/pairs/{{split}}", synthetic=True))


register_catalog()


# ----------------------------------------------------------------------------------------
# Raw record -> example
# ----------------------------------------------------------------------------------------
def _resize_nearest(array: np.ndarray, size: int) -> np.ndarray:
  if array.shape[:2] == (size, size):
    return array
  return np.asarray(Image.fromarray(array).resize((size, size), Image.NEAREST))


def dense_input(array: np.ndarray, size: int) -> np.ndarray:
  """uint8 map -> [size, size, C] f32 in [-1, 1] (min-max per image, as the reference)."""
  x = _resize_nearest(array, size).astype(np.float32)
  x = x[..., None] if x.ndim == 2 else x
  lo, hi = x.min(), x.max()
  return 2 * (x - lo) / (hi - lo + 1e-6) - 1


def expert_inputs(labels: dict, expert_names, size: int, table: experts.LabelTable) -> dict:
  out = {}
  for name in expert_names:
    if name not in labels:
      raise preprocessors.BadRecord(f"record has no {name!r} label (has {sorted(labels)})")
    label = labels[name]
    if name in experts.LABEL_EXPERTS:
      resized = experts.LabelMap(_resize_nearest(label.ids, size), label.names)
      out[f"expert_{name}"] = table.embed(resized).astype(np.float32)
      if name == "obj_detection":
        out["expert_obj_detection_instances"] = resized.ids.astype(np.int32)
    else:
      out[f"expert_{name}"] = dense_input(label, size)
  return out


def caption_arrays(ids, length: int) -> dict:
  ids = list(ids[:length - 1])
  arrays = {"tokens": [BOS_ID] + ids, "targets": ids + [EOS_ID]}
  out = {}
  for key, values in arrays.items():
    out[key] = np.full((length,), PAD_ID, np.int32)
    out[key][:len(values)] = values
  out["loss_mask"] = (np.arange(length) < len(ids) + 1).astype(np.float32)
  return out


class ExampleProcessor(processor_lib.RecordProcessor):
  """Raw labelled pair -> Prismer example (RGB, expert maps, caption); deterministic."""

  def __init__(self, data_config, seed):
    super().__init__(seed)
    self.vocab = Vocab(data_config.vocab_path)
    self.image_size = data_config.image_size
    self.resize_mode = data_config.resize_mode
    self.max_pixels = data_config.max_pixels
    self.text_length = data_config.text_length
    self.experts = experts.check_experts(data_config.experts)
    self.expert_size = data_config.expert_size
    self.table = experts.LabelTable(data_config.label_table, data_config.label_dim)

  def convert(self, spec, raw, rng):
    del rng  # no random choices per example
    image = preprocessors.load_image(raw["image"], self.image_size, self.resize_mode,
                                     self.max_pixels)
    ids = self.vocab.encode(preprocessors.caption_of(raw))
    if not ids:
      raise preprocessors.BadRecord("caption encodes to no tokens")
    try:
      labels = experts.decode_labels(raw.get("experts", []), raw.get("images") or [])
    except (ValueError, OSError) as e:
      raise preprocessors.BadRecord(f"unreadable expert labels: {e}") from None
    example = expert_inputs(labels, self.experts, self.expert_size, self.table)
    example.update(caption_arrays(ids, self.text_length))
    example["images"] = image[None].astype(np.float32)
    example["loss_weight"] = np.float32(spec.loss_weight)
    return example
