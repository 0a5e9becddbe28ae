"""Prismer data: labelled image-text pairs -> RGB, expert maps and a caption; the
`prismer_scenes` sample task and the evaluation tasks.

Labelling (`vlm-data experts`) is the ingest (`ingest/`, local or Beam) with Prismer's
labeller (`ingest.labellers.expert_maps`): it runs expert functions (`ingest.experts`) over a
dataset's images, or reads labels computed elsewhere (`--labels DIR`, the reference's
`<expert>/<key>.png` layout), and writes ArrayRecord shards plus `dataset.json`, so the
output directory is a task by its path (`config.data.mixture = DIR`). A record is an
image-text pair whose `images` are the experts' PNGs and whose `experts` header lists, in
the same order, each expert's name and, for label maps, the name of every id.

`prismer_scenes` (sample task): synthetic scenes labelled with what the generator knows
(`synthetic.labelled_scenes`), generated on first use.

One example (the pipeline stacks B):

    images                          [1, S, S, 3] f32  pixels in [-1, 1] (S = image_size)
    expert_<name>                   [E, E, C] f32     E = expert_size; dense maps min-max
                                                      scaled to [-1, 1]; label maps as
                                                      `LabelTable` vectors (C = label_dim)
    expert_obj_detection_instances  [E, E] i32        instance ids (255 = background)
    tokens / targets / loss_mask    [T]               BOS + caption / caption + EOS / 1 on
                                                      real targets (T = text_length)
    loss_weight                     [] f32

Maps are resized with nearest neighbours (ids must stay ids), as the reference does.

Packing (config.data.packing, data/packing.py): the decoder text of several examples shares
a row of `sequence_length` tokens; each example's image and expert maps go to one of the
row's `packed_images` slots. For that the processor gives every image key a leading slot
axis ([1, ...]) and adds `image_mask` [1] = 1 and `image_positions` [1] = 0 (the image
belongs to the example whose text starts there; the packer makes it a row index).
"""
import numpy as np
from PIL import Image

from vlm_jax.data import catalog, packing, preprocessors
from vlm_jax.data import processor as processor_lib
from vlm_jax.data.ingest import experts
from vlm_jax.data.synthetic import labelled_scenes, scenes
from vlm_jax.data.vocab import Vocab

TEMPLATES = {"caption": ("pairs",)}
TASKS = (catalog.TaskSpec("prismer_scenes", "pairs", "arrayrecord",
                          f"{labelled_scenes.SUBDIR}/{{split}}/*.array_record",
                          ensure=labelled_scenes.ensure),)
_CAPTION = ("exact_match", "cider", "bleu4")
# Prismer generates from a decoder prompt: BOS here (a VQA question would follow it).
EVAL_TASKS = (
    catalog.EvalTask("prismer_captions", "prismer_scenes", metrics=_CAPTION, captions=True),
    catalog.EvalTask("prismer_rank_captions", "prismer_scenes", kind="rank", num_examples=16),
    catalog.EvalTask("prismer_zero_shot_shapes", "prismer_scenes", kind="zero_shot",
                     **scenes.ZERO_SHOT_SHAPES, num_examples=16),
)


TEXT_KEYS = ("tokens", "targets", "loss_mask")


def image_keys(expert_names) -> tuple[str, ...]:
  """The keys the processor writes per image: RGB, the experts' maps (and instance ids)."""
  keys = ["images"] + [f"expert_{name}" for name in expert_names]
  if "obj_detection" in expert_names:
    keys.append("expert_obj_detection_instances")
  return tuple(keys)


def PACKING(data_config) -> packing.Layout:  # pylint: disable=invalid-name
  """Packed rows' layout (the module docstring); its image keys depend on the experts."""
  return packing.Layout(text_keys=TEXT_KEYS, valid_key="loss_mask",
                        image_keys=image_keys(data_config.experts) + ("image_mask",))


def packable(example: dict, expert_names) -> dict:
  """An unpacked example with the slot axis and anchors the packer needs (docstring)."""
  out = dict(example)
  for key in image_keys(expert_names)[1:]:
    out[key] = example[key][None]
  out["image_mask"] = np.ones((1,), np.float32)
  out["image_positions"] = np.zeros((1,), np.int32)
  return out


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


def caption_arrays(ids, length: int, vocab: Vocab) -> dict:
  """The decoder's arrays: BOS caption -> caption EOS (RoBERTa's <s> ... </s>)."""
  ids = list(ids[:length - 1])
  bos = vocab.require_bos("Prismer's caption decoder")
  arrays = {"tokens": [bos] + ids, "targets": ids + [vocab.eos_id]}
  out = {}
  for key, values in arrays.items():
    out[key] = np.full((length,), vocab.pad_id, np.int32)
    out[key][:len(values)] = values
  out["loss_mask"] = (np.arange(length) < len(ids) + 1).astype(np.float32)
  return out


class Processor(processor_lib.RecordProcessor):
  """Raw labelled pair -> Prismer example (RGB, expert maps, caption); deterministic."""

  def __init__(self, data_config, seed, evaluation: bool = False):
    super().__init__(data_config, seed, evaluation)  # held-out examples built as training's
    self.experts = experts.check_experts(data_config.experts)
    self.table = experts.LabelTable(data_config.label_table, data_config.label_dim)

  def convert(self, spec, raw, rng):
    del rng  # no random choices per example
    d = self.data_config
    image = preprocessors.load_image(raw["image"], d.image_size, d.resize_mode, d.max_pixels)
    ids = self.vocab.encode(preprocessors.caption_of(raw))
    if not ids:
      raise preprocessors.BadRecord("caption encodes to no tokens")
    try:
      labels = experts.decode_labels(raw.get("experts", []), raw.get("images") or [])
    except (ValueError, OSError) as e:
      raise preprocessors.BadRecord(f"unreadable expert labels: {e}") from None
    example = expert_inputs(labels, self.experts, d.expert_size, self.table)
    example.update(caption_arrays(ids, d.text_length, self.vocab))
    example["images"] = image[None].astype(np.float32)
    example["loss_weight"] = np.float32(spec.loss_weight)
    # evaluation batches are never packed (evaluation/ runs the unpacked model)
    return packable(example, self.experts) if d.packing and not self.evaluation else example
