"""Sequence packing of encoder-decoder examples (SimVLM), as T5/seqio pack them.

An example has an encoder stream (the text prefix), a decoder stream (decoder inputs,
targets, loss mask) and at most one image, which the encoder sees before its prefix. grain's
best-fit packer (`grain.experimental.BestFitPackIterDataset`, as in packing.py) packs the
three jointly: an example goes to a row only if its prefix, its decoder tokens and its image
all fit, and it gets the same segment number k (1-based) in each. A packed row (P =
`packed_prefix_length`, D = `packed_suffix_length`, K = `packed_images`) holds:

    prefix_tokens, prefix_mask   [P]    the examples' prefixes one after another, then padding
    prefix_segment_ids           [P]    k of each prefix token, 0 for padding
    prefix_positions             [P]    each token's position inside its own prefix
    tokens, targets, loss_mask   [D]    the examples' decoder streams one after another
    segment_ids, positions       [D]    k and position inside the example's decoder stream
    loss_weight                  [D]    the example's weight on each of its decoder tokens
    images [K, ...], image_mask [K]     the examples' images in slot order; unused slots zero
    image_segment_ids            [K]    k of the example that owns the slot, 0 if unused

An example without an image (a text-only document, image_mask 0) takes no slot. The model
(models/simvlm.py) puts the K slots' image tokens in front of the prefix stream, each with its
example's segment id, so the encoder attends bidirectionally within a segment, the decoder
causally within a segment, and the decoder cross-attends only to its own segment's encoder
tokens: the loss is the sum of the unpacked examples' losses. Counters and resumable state as
in packing.py.

Efficiency (`efficiency`) of encoder-decoder rows counts both streams' token slots: real
tokens = image tokens of present images + real prefix tokens + real decoder tokens; slots =
image tokens of every image slot + prefix slots + decoder slots, i.e. every token position the
encoder and the decoder compute on, unpacked or packed alike.
"""
import dataclasses
import math

import grain
import numpy as np

from vlm_jax.data import health, packing

PREFIX_SEGMENT_IDS, PREFIX_POSITIONS = "prefix_segment_ids", "prefix_positions"
IMAGE_SEGMENT_IDS = "image_segment_ids"


@dataclasses.dataclass(frozen=True)
class EncoderDecoderLayout:
  """Keys of a family's processed encoder-decoder example and the data config fields of the
  packed row lengths (module docstring)."""
  encoder_keys: tuple[str, ...] = ("prefix_tokens", "prefix_mask")
  decoder_keys: tuple[str, ...] = ("tokens", "targets", "loss_mask")
  image_key: str = "images"
  image_mask_key: str = "image_mask"
  encoder_length: str = "packed_prefix_length"  # data config fields: P and D of a row
  decoder_length: str = "packed_suffix_length"
  image_stride: int = 16  # image px per image token side (SimVLM's conv stem)

  def pack(self, ds: grain.IterDataset, data_config, *, seed: int) -> grain.IterDataset:
    return pack(ds, self, data_config, seed=seed)

  def efficiency(self, batches, data_config) -> float:
    return efficiency(batches, self, data_config)


def _valid_length(mask) -> int:
  valid = np.flatnonzero(np.asarray(mask) > 0)
  return int(valid[-1]) + 1 if valid.size else 0


class _Trim:
  """An example cut to its real prefix and decoder tokens, its image dropped if absent, its
  weight spread over its decoder tokens (picklable)."""

  def __init__(self, layout: EncoderDecoderLayout):
    self.layout = layout

  def __call__(self, example: dict) -> dict:
    layout = self.layout
    prefix = _valid_length(example[layout.encoder_keys[-1]])
    decoded = max(_valid_length(example[layout.decoder_keys[-1]]), 1)
    out = {k: np.asarray(example[k])[:prefix] for k in layout.encoder_keys}
    out.update({k: np.asarray(example[k])[:decoded] for k in layout.decoder_keys})
    out["loss_weight"] = np.full(decoded, example["loss_weight"], np.float32)
    out[health.SKIPPED_KEY] = packing._on_first_token(example[health.SKIPPED_KEY], decoded)
    out[health.TASK_KEY] = packing._on_first_token(example[health.TASK_KEY] + 1, decoded)
    present = np.asarray(example[layout.image_mask_key]) > 0
    out[layout.image_key] = np.asarray(example[layout.image_key])[present]
    out[layout.image_mask_key] = np.asarray(example[layout.image_mask_key])[present]
    return out


class _Finish:
  """grain's packed element -> the family's batch keys plus segment ids and positions of
  both streams and the image slots' segment ids (picklable)."""

  def __init__(self, layout: EncoderDecoderLayout):
    self.layout = layout

  def __call__(self, packed: dict) -> dict:
    layout = self.layout
    prefix, decoder = layout.encoder_keys[0], layout.decoder_keys[0]
    keys = (layout.encoder_keys + layout.decoder_keys
            + ("loss_weight", layout.image_key, layout.image_mask_key))
    out = {k: packed[k] for k in keys}
    out[PREFIX_SEGMENT_IDS] = packed[f"{prefix}_segment_ids"].astype(np.int32)
    out[PREFIX_POSITIONS] = packed[f"{prefix}_positions"].astype(np.int32)
    out[packing.SEGMENT_IDS] = packed[f"{decoder}_segment_ids"].astype(np.int32)
    out[packing.POSITIONS] = packed[f"{decoder}_positions"].astype(np.int32)
    out[IMAGE_SEGMENT_IDS] = packed[f"{layout.image_key}_segment_ids"].astype(np.int32)
    out[health.SKIPPED_KEY] = np.int32(packed[health.SKIPPED_KEY].sum())
    out[health.TASK_KEY] = packed[health.TASK_KEY].astype(np.int32)
    return out


def pack(ds: grain.IterDataset, layout: EncoderDecoderLayout, data_config, *,
         seed: int) -> grain.IterDataset:
  """Processed examples -> packed encoder-decoder rows; deterministic given `seed`."""
  if data_config.packed_images < 1:
    raise ValueError(f"config.data.packed_images={data_config.packed_images}: need >= 1 image "
                     "slot per packed row.")
  prefix, decoder = data_config[layout.encoder_length], data_config[layout.decoder_length]
  lengths = {k: prefix for k in layout.encoder_keys}
  lengths.update({k: decoder for k in layout.decoder_keys + ("loss_weight", health.SKIPPED_KEY,
                                                             health.TASK_KEY)})
  lengths.update({k: data_config.packed_images
                  for k in (layout.image_key, layout.image_mask_key)})
  ds = ds.map(_Trim(layout))
  ds = grain.experimental.BestFitPackIterDataset(
      ds, length_struct=lengths, num_packing_bins=data_config.packing_bins, seed=seed,
      shuffle_bins=False)
  return ds.map(_Finish(layout))


def image_tokens(layout: EncoderDecoderLayout, data_config) -> int:
  """Encoder tokens of one image (the stem's 'SAME'-padded grid)."""
  return math.ceil(data_config.image_size / layout.image_stride) ** 2


def efficiency(batches, layout: EncoderDecoderLayout, data_config) -> float:
  """Real tokens / token slots of encoder-decoder batches, packed or not (module docstring)."""
  per_image = image_tokens(layout, data_config)
  real = slots = 0
  for batch in batches:
    images = np.asarray(batch[layout.image_mask_key]) > 0
    streams = [np.asarray(batch[layout.encoder_keys[-1]]) > 0,
               np.asarray(batch[layout.decoder_keys[-1]]) > 0]
    real += per_image * int(images.sum()) + sum(int(s.sum()) for s in streams)
    slots += per_image * images.size + sum(s.size for s in streams)
  return real / slots
