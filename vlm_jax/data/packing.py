"""Sequence packing (`config.data.packing`): several examples share one row.

A family whose data module declares `PACKING = packing.Layout(...)` can be packed; the
pipeline (`pipeline.make_dataset`) then trims each processed example to its real tokens and
packs rows with grain's best-fit packer (`grain.experimental.BestFitPackIterDataset`, whose
state is part of the checkpointed iterator state, so packed runs resume exactly). A packed
row (T = `sequence_length` tokens, K = `packed_images` image slots) holds:

    text keys     [T]        the examples' tokens one after another, then padding (zeros)
    segment_ids   [T] i32    k for the k-th example of the row (1-based), 0 for padding
    positions     [T] i32    each token's position inside its own example
    loss_weight   [T] f32    the example's weight on each of its tokens (per-example [B]
                             unpacked; the loss takes both: train/step.py)
    image keys    [K, ...]   the examples' images in slot order, each example's together;
                             unused slots zero (their image_mask is 0, so the model never
                             splices or attends them)
    image_positions [K] i32  the row index of each image's first placeholder slot (Flamingo:
                             of its `<image>` token)

A row takes an example only if both its tokens and its images fit (K bounds the images as
T bounds the tokens). Attention never crosses segments: the model builds its masks from
`segment_ids` (causal and equal ids, `segment_mask.SegmentMask`), and each image is spliced
into its own example's slots (MiniGPT-v2) or cross-attended only by its own document's
tokens (Flamingo: `gated_xattn.media_visibility` with segment ids). The loss is the sum of
the unpacked examples' losses (the same target tokens, each with its example's weight).
Each row also carries its examples' task numbers (`health.TASK_KEY` [T]: task + 1 on each
example's first token), so the iterator's `examples` and `examples/<task>` counters
(health.py) count examples, not rows. Packing happens in each process on its own rows, so
the packed global batch depends on the number of processes (unpacked batches do not).

Rows longer than an unpacked example pack better: MiniGPT-v2's `packed=True` config option
uses rows of 2T (92-94% real tokens against 86-91% at T; docs/performance.md), CogAgent's
rows of 2-4T (`configs/cogagent.py` PACKED: 95-99%), Prismer's rows of 2T with 8 slots
(92-94%). Flamingo's documents and pairs are short next to T but bring 1-2 images each, so
its `packed=True` keeps rows of T and gives them more image slots (bench: 12 for 14% -> 97%
real tokens).

Families that declare a Layout:
- MiniGPT-v2: one image spliced into a causal LM.
- CogAgent: the same, and its `image_keys` add the high-res view (`high_res_images`), so
  both views of an example's image travel into the same slot; its model reads each slot's
  segment at the slot's first placeholder (`segment_mask.slot_segment_ids`) and lets a
  token cross-attend only its own example's high-res tokens (`segment_mask.packed_cross`).
- Prismer: packs its decoder texts (valid_key `loss_mask`); its PACKING is a function of the
  data config (the image keys are the configured experts' maps: `layout_of`), its processor
  gives the maps a slot axis and anchors each image at its text's first token, and its
  decoder cross-attends only its own slot's encoded tokens.
- Flamingo: interleaved documents and pairs with up to `max_images` images each; only
  present images travel (`Layout.image_valid_key`).
Encoder-decoder examples (SimVLM: an encoder stream, a decoder stream and an image) are
packed by packing_encoder_decoder.py, whose EncoderDecoderLayout has the same `pack` and
`efficiency` methods the pipeline and bench/packing_efficiency.py call.
"""
import dataclasses

import grain
import numpy as np

from vlm_jax.data import health

SEGMENT_IDS, POSITIONS = "segment_ids", "positions"


@dataclasses.dataclass(frozen=True)
class Layout:
  """Which keys of a family's processed example are packed how. An example has N image slots
  (`images` [N, ...], MiniGPT-v2 N = 1), slot n's position in the example's tokens at
  `image_positions` [N]. With `image_valid_key`, only the slots where it is > 0 travel into
  the row (an interleaved document with fewer images than N takes only as many row slots as
  it has images); without, every slot does."""
  text_keys: tuple[str, ...] = ("tokens", "targets", "loss_mask", "token_mask")
  image_keys: tuple[str, ...] = ("images", "image_mask")
  image_positions_key: str = "image_positions"
  valid_key: str = "token_mask"  # 1 for the example's real tokens (placeholders included)
  image_valid_key: str = ""  # e.g. "image_mask": 1 for a present image; "": keep all slots

  # A family's PACKING has these two (packing_encoder_decoder.EncoderDecoderLayout too).
  def pack(self, ds: grain.IterDataset, data_config, *, seed: int) -> grain.IterDataset:
    return pack(ds, self, data_config, seed=seed)

  def efficiency(self, batches, data_config) -> float:
    return efficiency(batches, self.valid_key)


def layout_of(family_module, family: str, data_config=None) -> Layout:
  """The family's `PACKING`: a Layout, or a function data_config -> Layout (for keys that
  depend on the config, e.g. Prismer's expert maps)."""
  layout = getattr(family_module, "PACKING", None)
  if layout is None:
    raise ValueError(f"config.data.packing=True: the {family!r} family's data module declares "
                     "no PACKING layout (vlm_jax/data/packing.py); set config.data.packing=False.")
  return layout(data_config) if callable(layout) else layout


def _on_first_token(value, length: int) -> np.ndarray:
  out = np.zeros(length, np.int32)
  out[0] = value
  return out


class _Trim:
  """An example cut to its real tokens, its weight spread over them (picklable)."""

  def __init__(self, layout: Layout):
    self.layout = layout

  def __call__(self, example: dict) -> dict:
    valid = np.flatnonzero(np.asarray(example[self.layout.valid_key]) > 0)
    length = int(valid[-1]) + 1 if valid.size else 1
    out = {k: np.asarray(example[k])[:length] for k in self.layout.text_keys}
    out["loss_weight"] = np.full(length, example["loss_weight"], np.float32)
    # health.py's count of records skipped before this example and its task number + 1 (0
    # marks no example: health.TASK_KEY), on its first token, so a row keeps all its examples'
    out[health.SKIPPED_KEY] = _on_first_token(example[health.SKIPPED_KEY], length)
    out[health.TASK_KEY] = _on_first_token(example[health.TASK_KEY] + 1, length)
    images = slice(None)
    if self.layout.image_valid_key:
      images = np.flatnonzero(np.asarray(example[self.layout.image_valid_key]) > 0)
    for key in self.layout.image_keys + (self.layout.image_positions_key,):
      out[key] = np.asarray(example[key])[images]
    return out


class _Finish:
  """grain's packed element -> the family's batch keys plus segment_ids and positions, image
  positions made absolute in the row (picklable)."""

  def __init__(self, layout: Layout):
    self.layout = layout

  def __call__(self, packed: dict) -> dict:
    text = self.layout.text_keys[0]
    segments = packed[f"{text}_segment_ids"].astype(np.int32)
    out = {k: packed[k] for k in self.layout.text_keys + ("loss_weight",)}
    out.update({k: packed[k] for k in self.layout.image_keys})
    out[SEGMENT_IDS] = segments
    out[health.SKIPPED_KEY] = np.int32(packed[health.SKIPPED_KEY].sum())
    out[health.TASK_KEY] = packed[health.TASK_KEY].astype(np.int32)
    out[POSITIONS] = packed[f"{text}_positions"].astype(np.int32)
    # Row index where each segment starts; an image slot of segment s is offset by it.
    first = {s: int(np.argmax(segments == s)) for s in np.unique(segments) if s}
    key = self.layout.image_positions_key
    slot_segments = packed[f"{self.layout.image_keys[0]}_segment_ids"]
    out[key] = np.asarray([first.get(int(s), 0) + int(p) if s else 0
                           for s, p in zip(slot_segments, packed[key])], np.int32)
    return out


def pack(ds: grain.IterDataset, layout: Layout, data_config, *, seed: int) -> grain.IterDataset:
  """Processed examples -> packed rows (module docstring); deterministic given `seed`."""
  if data_config.packed_images < 1:
    raise ValueError(f"config.data.packed_images={data_config.packed_images}: need >= 1 image "
                     "slot per packed row.")
  length = data_config.sequence_length
  lengths = {k: length for k in layout.text_keys + ("loss_weight", health.SKIPPED_KEY,
                                                    health.TASK_KEY)}
  lengths.update({k: data_config.packed_images
                  for k in layout.image_keys + (layout.image_positions_key,)})
  ds = ds.map(_Trim(layout))
  ds = grain.experimental.BestFitPackIterDataset(
      ds, length_struct=lengths, num_packing_bins=data_config.packing_bins, seed=seed,
      shuffle_bins=False)
  return ds.map(_Finish(layout))


def efficiency(batches, valid_key: str = "token_mask") -> float:
  """Real tokens / token slots over `batches` (dicts with `valid_key` [B, T])."""
  real = slots = 0
  for batch in batches:
    valid = np.asarray(batch[valid_key]) > 0
    real, slots = real + int(valid.sum()), slots + valid.size
  return real / slots
