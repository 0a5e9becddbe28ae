"""What the data pipeline delivers: batches laid out for display, token counts, realised
mixture proportions and bad-record tallies.

Layouts follow the batch keys a family documents, not its name: `prefix_tokens` (PrefixLM:
prefix | suffix), `image_positions` (images spliced into `tokens`: a run of placeholder
slots, or a single `<image>` token per item in an interleaved document), `expert_<name>`
maps (shown beside the RGB image), and boxes found in the text in either box syntax
(MiniGPT-v2 `{<x1><y1><x2><y2>}` in 0..100, CogAgent `[[x0,y0,x1,y1]]` in 0..999).
"""
import collections
import re

import numpy as np

from vlm_jax.data import boxes as minigpt_boxes
from vlm_jax.data import catalog, cogagent_boxes, health, pipeline
from vlm_jax.data.vocab import Vocab

_MINIGPT_BOX = re.compile(r"\{<\d+><\d+><\d+><\d+>\}")
EXPERT_PREFIX, INSTANCES_SUFFIX = "expert_", "_instances"


def with_mixture(config, mixture: str):
  """A copy of `config` reading `mixture` (a task or mixture name; '' keeps the config's)."""
  config = config.copy_and_resolve_references()
  if mixture:
    catalog.resolve(mixture)  # a clear error for an unknown name
    config.data.mixture = mixture
  return config


def read_batches(config, batch_size: int, num_batches: int = 1, seed: int = 0):
  """([batches], skipped-record counters) from the training pipeline, single process."""
  iterator = pipeline.make_train_iterator(config.data, global_batch_size=batch_size, seed=seed,
                                          process_index=0, process_count=1)
  batches = [next(iterator) for _ in range(num_batches)]
  counts = pipeline.skipped_record_counts(iterator)
  iterator.close()
  return batches, counts


def pixels(image: np.ndarray) -> np.ndarray:
  """[-1, 1] pixels (a video item: its first frame) -> [0, 1] for imshow."""
  image = np.asarray(image)
  if image.ndim == 4:
    image = image[0]
  return np.clip((image + 1.0) / 2.0, 0.0, 1.0)


def expert_pixels(value: np.ndarray) -> np.ndarray:
  """An expert map [H, W, C] -> something imshow draws: C=1 grey, C=3 RGB, else the
  channel mean (label embeddings)."""
  value = np.asarray(value, np.float32)
  if value.ndim == 2 or value.shape[-1] == 1:
    return value.reshape(value.shape[:2])
  if value.shape[-1] == 3:
    return np.clip((value + 1.0) / 2.0, 0.0, 1.0)
  return value.mean(axis=-1)


def find_boxes(text: str, width: int, height: int) -> list:
  """Pixel boxes (x0, y0, x1, y1) written in `text` in either family's box syntax."""
  found = [minigpt_boxes.pixel_box(minigpt_boxes.parse_box(m.group(0)), width, height)
           for m in _MINIGPT_BOX.finditer(text)]
  for group in cogagent_boxes.find_boxes(text):
    found += [cogagent_boxes.pixel_box(b, width, height) for b in group]
  return found


def _image_runs(tokens, positions, present) -> dict:
  """{start: end} of each present image's slots: the run of tokens equal to the first one
  (a single `<image>` token when the next token differs)."""
  runs = {}
  for start, ok in zip(positions, present):
    if not ok:
      continue
    end = start + 1
    while end < len(tokens) and tokens[end] == tokens[start]:
      end += 1
    runs[int(start)] = int(end)
  return runs


def example_layout(batch: dict, index: int, vocab: Vocab) -> list:
  """Example `index` as display pieces in reading order: ('text', str) and
  ('image', pixels [H, W, 3], [pixel boxes], {expert name: map})."""
  images = np.asarray(batch["images"][index])
  present = (np.asarray(batch["image_mask"][index]) > 0 if "image_mask" in batch
             else np.ones(images.shape[:1], bool))  # e.g. Prismer: one image, always there
  experts = {k[len(EXPERT_PREFIX):]: expert_pixels(v[index]) for k, v in batch.items()
             if k.startswith(EXPERT_PREFIX) and not k.endswith(INSTANCES_SUFFIX)}
  if "prefix_tokens" in batch:  # PrefixLM: the encoder's prefix, then the decoder's suffix
    prefix = vocab.decode(batch["prefix_tokens"][index][batch["prefix_mask"][index] > 0])
    suffix = vocab.decode(batch["targets"][index][batch["loss_mask"][index] > 0])
    texts = [f"{prefix} | {suffix}"]
    pieces = [("image", pixels(images[n]), [], experts) for n in np.flatnonzero(present)]
  elif "image_positions" in batch:  # images spliced into the token stream, in order
    tokens = np.asarray(batch["tokens"][index])
    valid = np.asarray(batch["token_mask"][index]) > 0
    runs = _image_runs(tokens, batch["image_positions"][index], present)
    order = {start: n for n, start in enumerate(batch["image_positions"][index]) if present[n]}
    pieces, texts, text, t = [], [], [], 0
    while t < len(tokens):
      if t in runs:
        texts.append(vocab.decode(text))
        pieces += [("text", texts[-1]), ("image", pixels(images[order[t]]), [], experts)]
        text, t = [], runs[t]
        continue
      if valid[t]:
        text.append(int(tokens[t]))
      t += 1
    texts.append(vocab.decode(text))
    pieces.append(("text", texts[-1]))
  else:  # decoder inputs only: the target text
    texts = [vocab.decode(batch["targets"][index][batch["loss_mask"][index] > 0])]
    pieces = [("image", pixels(images[n]), [], experts) for n in np.flatnonzero(present)]
  if "prefix_tokens" in batch or "image_positions" not in batch:
    pieces.append(("text", texts[0]))
  # Boxes in the text refer to the image they follow (the only one, outside documents).
  laid_out, image = [], None
  for piece in pieces:
    if piece[0] == "image":
      image = len(laid_out)
    elif image is not None and piece[1]:
      kind, pix, found, maps = laid_out[image]
      height, width = pix.shape[:2]
      laid_out[image] = (kind, pix, found + find_boxes(piece[1], width, height), maps)
    laid_out.append(piece)
  return [p for p in laid_out if p[0] == "image" or p[1].strip()]


def token_counts(batches) -> dict:
  """{'input tokens': [...], 'loss tokens': [...]} per example."""
  counts = collections.defaultdict(list)
  for batch in batches:
    inputs = np.sum(batch.get("token_mask", batch["loss_mask"]), axis=1)
    if "prefix_mask" in batch:  # PrefixLM: encoder prefix + decoder inputs
      inputs = np.sum(batch["prefix_mask"], axis=1) + np.sum(batch["loss_mask"], axis=1)
    counts["input tokens"] += list(inputs.astype(int))
    counts["loss tokens"] += list(np.sum(batch["loss_mask"], axis=1).astype(int))
  return dict(counts)


def realised_proportions(config, num_records: int, seed: int = 0) -> list:
  """[(task, declared rate, realised share over the first `num_records` of the stream)]."""
  records = pipeline.mixed_records(config.data, seed=seed)
  counts = collections.Counter(records[i][0].name for i in range(num_records))
  rates = catalog.resolve(config.data.mixture).rates
  total = sum(rate for _, rate in rates)
  return [(task, rate / total, counts[task] / num_records) for task, rate in rates]


def bad_record_tally(config, num_records: int, seed: int = 0) -> collections.Counter:
  """Counter of (task, reason) over the first `num_records` raw records, converted by the
  family's ExampleProcessor ('ok' for usable records)."""
  processor_cls, _ = pipeline.converter(config.data.converter)
  processor = processor_cls(config.data, seed)
  records = pipeline.mixed_records(config.data, seed=seed)
  tally = collections.Counter()
  for i in range(num_records):
    spec, raw = records[i]
    out = processor(i, (spec, raw))
    tally[(spec.name, out.reason.split(":")[0] if isinstance(out, health.Skipped) else "ok")] += 1
  return tally
