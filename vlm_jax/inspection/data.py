"""What the data pipeline delivers: batches laid out for display, token counts, realised
mixture proportions and bad-record tallies.

Layouts follow the batch keys a family documents, not its name: `prefix_tokens` (PrefixLM:
prefix | suffix), `image_positions` (images spliced into `tokens`: a run of placeholder
slots, or a single `<image>` token per item in an interleaved document), `expert_<name>`
maps (shown beside the RGB image), and boxes found in the text in the family's box format
(its data module's `BOX_FORMAT`). `vlm-data inspect` prints the same views as text.
"""
import collections
import copy

import numpy as np

from vlm_jax import storage
from vlm_jax.data import catalog, families, health, pipeline
from vlm_jax.data.boxes import BoxFormatError
from vlm_jax.data.sources import arrayrecord, jsonl, webdataset
from vlm_jax.data.vocab import Vocab

EXPERT_PREFIX, INSTANCES_SUFFIX = "expert_", "_instances"


def with_mixture(config, mixture: str):
  """A copy of `config` reading `mixture` (any form of config.data.mixture; '' keeps the
  config's)."""
  config = copy.deepcopy(config)  # keeps config.data.mixture's `object` type
  if mixture:
    config.data.mixture = mixture
    pipeline.resolve(config.data, config.model.name)  # a clear error if unknown
  return config


def read_batches(config, batch_size: int, num_batches: int = 1, seed: int = 0):
  """([batches], skipped-record counters) from the training pipeline, single process."""
  iterator = pipeline.make_train_iterator(config.data, config.model.name,
                                          global_batch_size=batch_size, seed=seed,
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


def find_boxes(text: str, width: int, height: int, formats) -> list:
  """Pixel boxes (x0, y0, x1, y1) written in `text` in the box format `formats` (None: none);
  malformed box text shows no box."""
  if formats is None:
    return []
  try:
    return [formats.pixel_box(b, width, height) for b in formats.find_boxes(text)]
  except BoxFormatError:
    return []


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


def example_layout(batch: dict, index: int, vocab: Vocab, formats=None) -> list:
  """Example `index` as display pieces in reading order: ('text', str) and
  ('image', pixels [H, W, 3], [pixel boxes in box format `formats`], {expert name: map})."""
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
      laid_out[image] = (kind, pix, found + find_boxes(piece[1], width, height, formats),
                          maps)
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
  records = pipeline.mixed_records(config.data, config.model.name, seed=seed)
  counts = collections.Counter(records[i][0].name for i in range(num_records))
  rates = pipeline.resolve(config.data, config.model.name).tasks
  total = sum(rate for _, rate in rates)
  return [(spec.name, rate / total, counts[spec.name] / num_records) for spec, rate in rates]


def bad_record_tally(config, num_records: int, seed: int = 0) -> collections.Counter:
  """Counter of (task, reason) over the first `num_records` raw records, converted by the
  family's Processor ('ok' for usable records)."""
  processor = pipeline.make_processor(config.data, config.model.name, seed)
  records = pipeline.mixed_records(config.data, config.model.name, seed=seed)
  tally = collections.Counter()
  for i in range(num_records):
    spec, raw = records[i]
    out = processor(i, (spec, raw))
    tally[(spec.name, out.reason.split(":")[0] if isinstance(out, health.Skipped) else "ok")] += 1
  return tally


# ----------------------------------------------------------------------------------------
# `vlm-data inspect`: the same views as text
# ----------------------------------------------------------------------------------------
def _describe(value):
  if isinstance(value, bytes):
    return f"<{len(value)} bytes>"
  if isinstance(value, list):
    return "[" + ", ".join(_describe(v) for v in value) + "]"
  if isinstance(value, str) and len(value) > 200:
    return repr(value[:200] + "...")
  return repr(value)


def record_lines(record: dict) -> str:
  return "- " + "\n  ".join(f"{k}: {_describe(v)}" for k, v in record.items())


def directory_records(path: str, num: int) -> tuple[str, list]:
  """(what the directory holds, its first `num` raw records): ingested ArrayRecord,
  webdataset tars, jsonl or parquet."""
  if storage.glob(storage.join(path, "*.parquet")) and not storage.glob(
      storage.join(path, "*.tar")):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    table = pq.ParquetFile(storage.open(storage.glob(storage.join(path, "*.parquet"))[0], "rb"))
    rows = next(table.iter_batches(batch_size=num)).to_pylist()[:num]
    return f"parquet, {table.metadata.num_rows} rows in the first file", rows
  for pattern, make in (("*.array_record", arrayrecord.ArrayRecordSource),
                        ("*.tar", webdataset.WebDatasetSource),
                        ("*.jsonl", jsonl.JsonlTextSource)):
    paths = storage.glob(storage.join(path, pattern))
    if paths:
      source = make(paths)
      return repr(source), [source[i] for i in range(min(num, len(source)))]
  raise FileNotFoundError(f"{path}: no .array_record, .tar, .jsonl or .parquet files")


def family_of(name: str) -> str:
  """The shipped family whose data module declares task or mixture `name`."""
  for family in families.available():
    module = families.load(family)
    if name in catalog.tasks(module) or name in catalog.mixtures(module):
      return family
  raise KeyError(f"no shipped family declares a task or mixture {name!r}; pass --config "
                 "configs/<family>.py:<size> to read it with that family")


def stream_lines(config, num: int, mixture_examples: int) -> list[str]:
  """The first `num` training examples as the model sees them, and for a mixture the
  realised proportions of its tasks next to the declared rates."""
  vocab = Vocab(config.data.vocab_path)
  (batch,), counts = read_batches(config, num)
  lines = []
  for i in range(num):
    pieces = example_layout(batch, i, vocab, families.box_format(config.model.name))
    lines.append(f"[{i}] " + " ".join(
        f"<image {p[1].shape[1]}x{p[1].shape[0]} mean {p[1].mean():.2f}"
        + (f", {len(p[2])} boxes" if p[2] else "") + ">" if p[0] == "image" else repr(p[1])
        for p in pieces))
  lines.append(f"bad records skipped: {counts.get('skipped_records', 0)}")
  rows = realised_proportions(config, mixture_examples)
  if len(rows) > 1:
    lines.append(f"realised proportions over {mixture_examples} examples:")
    lines += [f"  {task:30s} rate {rate:.3f}  realised {share:.3f}" for task, rate, share in rows]
  return lines
