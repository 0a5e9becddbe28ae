"""Flamingo data: interleaved documents and image-text pairs -> the Flamingo batch; tasks and
the `pretrain_flamingo` mixture.

Text layout (OpenFlamingo's): each media item is an `<image>` token that opens a chunk;
`<|endofchunk|>` closes the chunk before the next `<image>` and at the end:

    BOS text0 <image> text1 text2 <|endofchunk|> <image> text3 <|endofchunk|> EOS PAD...

(BOS: what the vocabulary's tokenizer puts before a text, `Vocab.start_ids`; none for
OpenFlamingo's MPT / RedPajama tokenizers.)

Loss (OpenFlamingo's MMC4 labels): on the text inside a chunk, its closing
`<|endofchunk|>` included; not on `<image>` tokens, text before the first image, text
between a chunk's end and the next image, BOS/EOS or padding. An image-text pair is the
one-image document `<image> caption <|endofchunk|>`. A document is cut at its
(max_images + 1)-th image and at `sequence_length` tokens; an image whose `<image>` token
does not fit is dropped with everything after it.

Video: with `frames_per_media` F > 0 every media item is F frames ([N, F, H, W, 3]); a
clip (a list of frame bytes) is sampled to F evenly spaced frames (its last frame repeated
when shorter), and a still image is repeated F times (Flamingo treats images as one-frame
videos; repeating keeps the shapes fixed).

Example (the pipeline stacks B of them; see `vlm_jax.models.flamingo` for the batch):

    images          [N, H, W, 3] f32 (video [N, F, H, W, 3])   zeros in absent slots
    image_mask      [N] f32          1 for a real media item
    image_positions [N] i32          index of item n's `<image>` token in `tokens` (0 if absent)
    tokens, targets, loss_mask, token_mask   [T]
    loss_weight     [] f32           the task's loss weight

Packing (config.data.packing, `PACKING`: data/packing.py): several documents and pairs
share a row of T tokens and its `packed_images` media slots, each bringing only its present
images; a document's images are visible only to its own tokens (models/flamingo.py).

Templates: `document` (interleaved documents and pairs) and `text` (a text-only document,
e.g. C4: BOS text EOS with the loss on every token and no media, so the gated
cross-attention passes the frozen LM's language modelling through).

Tasks (catalog; synthetic sample data, generated on first use):

    flamingo_mmc4     MMC4 jsonl (images inline), interleaved, loss weight 1.0
    flamingo_obelics  OBELICS parquet, interleaved, loss weight 1.0
    flamingo_pairs    image-text pairs (webdataset), loss weight 0.2

`pretrain_flamingo` samples them at 0.35 / 0.35 / 0.3. The paper's loss weights are M3W 1.0,
ALIGN 0.2, LTIP 0.2 (VTP 0.03 for video pairs, which we have no data for); the paper
accumulates gradients over per-dataset batches, here one batch mixes them by rate and the
weights scale each example's token losses.
"""
import re

import numpy as np

from vlm_jax.data import catalog, packing, preprocessors
from vlm_jax.data import processor as processor_lib
from vlm_jax.data.synthetic import scenes
from vlm_jax.data.vocab import Vocab

IMAGE_TOKEN, END_OF_CHUNK_TOKEN = "<image>", "<|endofchunk|>"
END_OF_CHUNK = "end_of_chunk"  # a document item kind (encode_document)

# A pair is the one-image document; text records are documents without media.
TEMPLATES = {"document": ("interleaved", "pairs"), "text": ("text",)}
TASKS = (
    catalog.sample_task("flamingo_mmc4", "interleaved", "mmc4",
                        f"{catalog.SAMPLE_INTERLEAVED}/mmc4.jsonl"),
    catalog.sample_task("flamingo_obelics", "interleaved", "obelics",
                        f"{catalog.SAMPLE_INTERLEAVED}/obelics.parquet"),
    catalog.sample_task("flamingo_pairs", "pairs", "webdataset", catalog.SAMPLE_PAIRS,
                        loss_weight=0.2),
)
MIXTURES = {"pretrain_flamingo": (("flamingo_mmc4", 0.35), ("flamingo_obelics", 0.35),
                                  ("flamingo_pairs", 0.3))}
# Documents and pairs pack several to a row (config.data.packing), each bringing only its
# present images into the row's packed_images slots.
PACKING = packing.Layout(image_valid_key="image_mask")
_CAPTION = ("exact_match", "cider", "bleu4")
EVAL_TASKS = (
    catalog.EvalTask("flamingo_captions", "flamingo_pairs", metrics=_CAPTION, captions=True),
    catalog.EvalTask("flamingo_captions_2shot", "flamingo_pairs", metrics=_CAPTION, shots=2),
    catalog.EvalTask("flamingo_captions_2shot_similar", "flamingo_pairs", metrics=_CAPTION,
                     shots=2, support="similar", num_examples=16),
    catalog.EvalTask("flamingo_rank_captions", "flamingo_pairs", kind="rank",
                     keep=scenes.is_scene, num_examples=8),
)


# ----------------------------------------------------------------------------------------
# Document -> fixed-shape token arrays
# ----------------------------------------------------------------------------------------
def document_items(raw: dict) -> list:
  """A raw record -> [("text", str) | ("image", media)] in document order (media: image
  bytes, or a list of frame bytes for a clip)."""
  if raw.get("kind") == "interleaved" or "texts" in raw:
    items = []
    for text, image in zip(raw["texts"], raw["images"]):
      if image is not None:
        items.append(("image", image))
      elif text and text.strip():
        items.append(("text", preprocessors.clean_text(text)))
    return items
  return [("image", raw["image"]), ("text", preprocessors.caption_of(raw))]


def encode_document(vocab: Vocab, items, *, sequence_length: int, max_images: int,
                    loss_weight: float = 1.0, text_only: bool = False) -> tuple[dict, list]:
  """(token arrays of the module docstring's layout, the media kept, in order). items:
  ("text", str), ("image", media) or (END_OF_CHUNK, None), an `<|endofchunk|>` written
  there (closing the open chunk early: text after it stays outside the chunk). text_only: a document without media,
  loss on every token."""
  image_id = vocab.token_id(IMAGE_TOKEN)
  chunk_id = vocab.token_id(END_OF_CHUNK_TOKEN)
  ids, media, open_chunk = list(vocab.start_ids), [], False
  for kind, value in items:
    if kind == "image":
      if len(media) == max_images:
        break
      if open_chunk:
        ids.append(chunk_id)
      media.append((len(ids), value))
      ids.append(image_id)
      open_chunk = True
    elif kind == END_OF_CHUNK:  # here, closing the open chunk before text that follows it
      ids.append(chunk_id)
      open_chunk = False
    else:
      ids += vocab.encode(value)
  if open_chunk:
    ids.append(chunk_id)
  ids.append(vocab.eos_id)
  ids = ids[:sequence_length + 1]
  n = len(ids) - 1  # inputs ids[:-1] predict ids[1:]
  media = [(p, m) for p, m in media if p < n]
  if not media and not text_only:
    raise preprocessors.BadRecord("no image fits in the sequence")
  in_chunk, labelled = text_only, []
  for token in ids:
    if token == image_id:
      in_chunk = True
      labelled.append(False)
      continue
    labelled.append(in_chunk)
    if token == chunk_id:
      in_chunk = False
  tokens = np.full((sequence_length,), vocab.pad_id, np.int32)
  targets = np.full((sequence_length,), vocab.pad_id, np.int32)
  tokens[:n], targets[:n] = ids[:-1], ids[1:]
  loss_mask = np.zeros((sequence_length,), np.float32)
  loss_mask[:n] = labelled[1:]
  token_mask = np.zeros((sequence_length,), np.float32)
  token_mask[:n] = 1.0
  positions = np.zeros((max_images,), np.int32)
  positions[:len(media)] = [p for p, _ in media]
  image_mask = np.zeros((max_images,), np.float32)
  image_mask[:len(media)] = 1.0
  return ({"tokens": tokens, "targets": targets, "loss_mask": loss_mask,
           "token_mask": token_mask, "image_positions": positions, "image_mask": image_mask,
           "loss_weight": np.float32(loss_weight)}, [m for _, m in media])


def sample_frames(frames: list, count: int) -> list:
  """`count` evenly spaced frames of a clip (the last one repeated when it is shorter)."""
  if not frames:
    raise preprocessors.BadRecord("video with no frames")
  if len(frames) <= count:
    return list(frames) + [frames[-1]] * (count - len(frames))
  return [frames[i] for i in np.linspace(0, len(frames) - 1, count).round().astype(int)]


def media_pixels(media, *, image_size: int, frames_per_media: int, resize_mode: str = "pad",
                 max_pixels: int = preprocessors.DEFAULT_MAX_PIXELS) -> np.ndarray:
  """One media item -> [H, W, 3] (frames_per_media 0) or [F, H, W, 3] f32 in [-1, 1]."""
  load = lambda data: preprocessors.load_image(data, image_size, resize_mode, max_pixels)
  if not frames_per_media:
    if isinstance(media, (list, tuple)):
      raise preprocessors.BadRecord("a video clip, but data.frames_per_media is 0")
    return load(media)
  clip = list(media) if isinstance(media, (list, tuple)) else [media]
  return np.stack([load(frame) for frame in sample_frames(clip, frames_per_media)])


def document_example(items, *, vocab: Vocab, image_size: int, sequence_length: int,
                     max_images: int, frames_per_media: int = 0, loss_weight: float = 1.0,
                     resize_mode: str = "pad",
                     max_pixels: int = preprocessors.DEFAULT_MAX_PIXELS,
                     text_only: bool = False) -> tuple[dict, int]:
  """(the example of document items (`encode_document`) with its pixels, media kept)."""
  example, media = encode_document(vocab, items, sequence_length=sequence_length,
                                   max_images=max_images, loss_weight=loss_weight,
                                   text_only=text_only)
  frame_shape = (frames_per_media,) if frames_per_media else ()
  images = np.zeros((max_images,) + frame_shape + (image_size, image_size, 3), np.float32)
  for n, item in enumerate(media):
    images[n] = media_pixels(item, image_size=image_size, frames_per_media=frames_per_media,
                             resize_mode=resize_mode, max_pixels=max_pixels)
  example["images"] = images
  return example, len(media)


def convert(raw: dict, *, text_only: bool = False, **kwargs):
  """A raw record -> example; kwargs: `document_example`'s."""
  items = [("text", preprocessors.text_of(raw))] if text_only else document_items(raw)
  return document_example(items, text_only=text_only, **kwargs)[0]


class Processor(processor_lib.RecordProcessor):
  """Raw record (interleaved document or pair) -> Flamingo example; deterministic (held-out
  examples are built as training's)."""

  def convert(self, spec, raw, rng):
    del rng  # no random choices per example
    d = self.data_config
    return convert(raw, vocab=self.vocab, loss_weight=spec.loss_weight,
                   image_size=d.image_size, sequence_length=d.sequence_length,
                   max_images=d.max_images, frames_per_media=d.get("frames_per_media", 0),
                   resize_mode=d.resize_mode, max_pixels=d.max_pixels,
                   text_only=spec.template == "text")


# ----------------------------------------------------------------------------------------
# Benchmarks (`vlm_jax.evaluation.family_benchmarks`): OpenFlamingo's prompts
# ----------------------------------------------------------------------------------------
BENCHMARK_PROMPTS = {"vqa": "Question:{} Short answer:"}  # OpenFlamingo's get_vqa_prompt
BENCHMARK_SHOTS = ("vqa",)  # the kinds asked with in-context examples (`shots`)


def benchmark_prompt(kind: str, text: str) -> str:
  """The text after the query's `<image>` for a benchmark question."""
  if kind not in BENCHMARK_PROMPTS:
    raise ValueError(f"Flamingo has no {kind!r} benchmark prompt; it has "
                     f"{sorted(BENCHMARK_PROMPTS)}")
  return BENCHMARK_PROMPTS[kind].format(text)


def benchmark_example(kind: str, image, text: str, data_config, vocab: Vocab, shots=()):
  """(generation inputs, stop id `<|endofchunk|>`): OpenFlamingo's evaluate_vqa prompt,
  each shot (image, question, answer) as `<image>Question:{q} Short answer:{a}<|endofchunk|>`
  and a newline (without `<image>` for a shot whose image is None: OpenFlamingo's 0-shot
  text-only demonstrations), then the query `<image>Question:{q} Short answer:`, after
  BOS."""
  items = []
  for shot_image, question, answer in shots:
    items += [("image", shot_image)] if shot_image is not None else []
    items += [("text", benchmark_prompt(kind, question) + answer), (END_OF_CHUNK, None),
              ("text", "\n")]
  items += [("image", image), ("text", benchmark_prompt(kind, text))]
  d = data_config
  example, kept = document_example(
      items, vocab=vocab, image_size=d.image_size, sequence_length=d.sequence_length,
      max_images=d.max_images, frames_per_media=d.get("frames_per_media", 0),
      resize_mode=d.resize_mode, max_pixels=d.max_pixels)
  wanted = sum(image is not None for image, _, _ in shots) + 1
  if kept < wanted:
    raise preprocessors.BadRecord(f"{wanted - 1} shots and the query need {wanted} images; "
                                  f"data.max_images is {d.max_images}")
  chunk_id = vocab.token_id(END_OF_CHUNK_TOKEN)
  end = int(np.flatnonzero(example["tokens"] == chunk_id)[-1])  # the answer starts here
  if end + 1 < int(example["token_mask"].sum()):  # the query's chunk did not close
    raise preprocessors.BadRecord("the prompt does not fit in data.sequence_length")
  example["tokens"][end:] = vocab.pad_id
  example["token_mask"][end:] = 0.0
  return example, chunk_id


def benchmark_answer(kind: str, generated: str) -> str:
  """OpenFlamingo's postprocess_vqa_generation: the text before a new 'Question'/'Answer'/
  'Short', up to the first ', '."""
  del kind
  return re.split("Question|Answer|Short", generated, maxsplit=1)[0].split(", ")[0].strip()
