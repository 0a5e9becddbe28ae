"""MiniGPT-v2 data: template, task identifiers, conversation encoding, synthetic stage mixtures.

Template (LLaMA-2 chat, one image in the first turn; loss only on the answers):

    <s>[INST] <Img><ImageHere></Img> [task] instruction [/INST] answer</s>[INST] instruction2
    [/INST] answer2</s>

`<ImageHere>` becomes `image_tokens` placeholder slots that the model overwrites with the
projected visual tokens (`image_positions` gives the first slot). Task identifiers:

    [vqa]        visual question answering          short answer
    [caption]    image captioning                   caption
    [grounding]  grounded image captioning          caption with <p>phrase</p>{box}
    [refer]      referring expression comprehension phrase -> {box}
    [identify]   referring expression generation    {box} -> phrase
    [detection]  phrase parsing and grounding       names -> <p>name</p>{box}<delim>{box}

Boxes: `boxes.percent` ({<x1><y1><x2><y2>}, int(coord / size * 100), 0..100).

Templates (a task's `template` field; `BUILDERS`): caption and weak_caption read only the
caption, so they run on any image-text pair (web alt-text, an ingested directory: the
default for pairs); the others need objects with boxes. Real boxes come from `grounding`
records (a TFDS grounding dataset: `objects` with phrases and boxes, records.py), which the
box templates grounding (their default), refer, identify and detection take. The paper's
stage-1/2 data code was never released; our sample tasks derive every template from the
shipped synthetic pairs, whose objects `synthetic.scene_objects` recovers from the pixels.
Stages (mixtures):

    minigpt_v2_stage1  weakly labelled (raw captions, grounded captions; sampled 70%)
                       + fine-grained tasks (30%)
    minigpt_v2_stage2  fine-grained tasks only
    minigpt_v2_stage3  fine-grained (60%) + instructions without identifier (20%)
                       + multi-round conversations mixing tasks on one image (20%)

Batch (one example; the pipeline stacks B of them), `sequence_length` T, `image_tokens` L:

    images          [1, H, W, 3] f32  pixels in [-1, 1]
    image_mask      [1] f32           1 (every example has its image)
    tokens          [T] i32           BOS, template and answers, placeholders, then PAD
    targets         [T] i32           tokens shifted left by one (next-token targets)
    loss_mask       [T] f32           1 where the target is an answer token or its EOS
    token_mask      [T] f32           1 for real input tokens (placeholders included)
    image_positions [1] i32           index in `tokens` of the first of the L image slots
    loss_weight     [] f32            the task's loss weight

The batch's shapes: `vlm_jax.models.minigpt_v2.batch_spec`.
"""
import dataclasses
import re

import numpy as np

from vlm_jax.data import catalog, packing, preprocessors
from vlm_jax.data import processor as processor_lib
from vlm_jax.data.boxes import percent
from vlm_jax.data.synthetic import scene_objects, scenes
from vlm_jax.data.vocab import Vocab

TASK_IDENTIFIERS = ("[vqa]", "[caption]", "[grounding]", "[refer]", "[detection]",
                    "[identify]")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}


@dataclasses.dataclass(frozen=True)
class Turn:
  instruction: str  # without the task identifier
  answer: str
  task: str = ""  # a TASK_IDENTIFIERS entry, or "" for free-form instructions

  def __post_init__(self):
    if self.task and self.task not in TASK_IDENTIFIERS:
      raise ValueError(f"task identifier {self.task!r}: expected one of {TASK_IDENTIFIERS} "
                       "or ''.")


def _instruction_text(turn: Turn) -> str:
  return f"{turn.task} {turn.instruction}" if turn.task else turn.instruction


def split_task(instruction: str) -> tuple[str, str]:
  """'[vqa] what ...' -> ('[vqa]', 'what ...'); no identifier -> ('', instruction).
  A bracketed word that is not a known identifier raises (likely a typo)."""
  match = re.match(r"\s*(\[[^\]\s]+\])\s*(.*)", instruction, re.S)
  if not match:
    return "", instruction.strip()
  if match.group(1) not in TASK_IDENTIFIERS:
    raise ValueError(f"unknown task identifier {match.group(1)!r} in {instruction!r}; "
                     f"expected one of {TASK_IDENTIFIERS}")
  return match.group(1), match.group(2).strip()


# ----------------------------------------------------------------------------------------
# Conversation -> fixed-shape arrays
# ----------------------------------------------------------------------------------------
def placeholder_id(vocab: Vocab) -> int:
  try:
    return vocab.token_id("<image>")
  except KeyError:
    return vocab.placeholder_id


def encode_conversation(vocab: Vocab, turns, *, image_tokens: int, sequence_length: int,
                        loss_weight: float = 1.0, open_last: bool = False) -> dict:
  """Token arrays of the batch layout (module docstring) for one conversation.

  Turns that do not fit in `sequence_length` are dropped from the end; if not even the first
  answer's first token fits, raises `preprocessors.BadRecord`. open_last: the last turn's
  answer is left out, so `tokens`/`token_mask` hold a prompt ending in '[/INST]' for
  generation (`vlm_jax.decode.generate`); then any turn that does not fit raises.
  """
  if not turns:
    raise ValueError("a conversation needs at least one turn")
  ids = vocab.start_ids + vocab.encode("[INST] <Img>")
  image_position = len(ids)
  ids += [placeholder_id(vocab)] * image_tokens
  is_answer = [False] * len(ids)
  for i, turn in enumerate(turns):
    prompt = (("</Img> " if i == 0 else "[INST] ") + _instruction_text(turn) + " [/INST]")
    prompt_ids = vocab.encode(prompt)
    last_open = open_last and i == len(turns) - 1
    answer_ids = [vocab.pad_id] if last_open else vocab.encode(turn.answer) + [vocab.eos_id]
    if len(ids) + len(prompt_ids) + len(answer_ids) > sequence_length + 1:
      if i == 0 or open_last:  # a generation prompt must keep its last question
        raise preprocessors.BadRecord(
            f"turn {i} needs {len(ids) + len(prompt_ids) + len(answer_ids) - 1} tokens, "
            f"more than sequence_length={sequence_length}")
      break
    ids += prompt_ids + answer_ids
    is_answer += [False] * len(prompt_ids) + [not last_open] * len(answer_ids)
  n = len(ids) - 1  # inputs ids[:-1] predict ids[1:]
  tokens = np.full((sequence_length,), vocab.pad_id, np.int32)
  targets = np.full((sequence_length,), vocab.pad_id, np.int32)
  tokens[:n], targets[:n] = ids[:-1], ids[1:]
  loss_mask = np.zeros((sequence_length,), np.float32)
  loss_mask[:n] = is_answer[1:]
  token_mask = np.zeros((sequence_length,), np.float32)
  token_mask[:n] = 1.0
  return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask,
          "token_mask": token_mask, "image_positions": np.asarray([image_position], np.int32),
          "loss_weight": np.float32(loss_weight)}


# ----------------------------------------------------------------------------------------
# Task turns
# ----------------------------------------------------------------------------------------
def _choice(rng, options):
  return options[int(rng.integers(len(options)))]


def _plural(shape, count):
  return shape + ("s" if count > 1 else "")


def caption_turn(objects, caption, rng) -> Turn:
  return Turn(_choice(rng, ("Briefly describe this image.", "Describe the image briefly.",
                            "What is in this picture?")), caption, "[caption]")


def vqa_turn(objects, caption, rng) -> Turn:
  obj = _choice(rng, objects)
  if not obj.shape:
    return Turn("What is written in the image?", obj.phrase, "[vqa]")
  things, be = _plural(obj.shape, obj.count), ("are" if obj.count > 1 else "is")
  kind = int(rng.integers(4))
  if kind == 0:
    return Turn(f"What colour {be} the {things}?", obj.colour, "[vqa]")
  if kind == 1:
    return Turn(f"How many {obj.colour} {_plural(obj.shape, 2)} are there?",
                NUMBER_WORDS[obj.count], "[vqa]")
  if kind == 2:
    return Turn(f"What shape is {scenes.PHRASES[obj.position]}?", obj.shape, "[vqa]")
  return Turn(f"Where {be} the {obj.colour} {things}?", scenes.PHRASES[obj.position], "[vqa]")


def grounded_caption(objects) -> str:
  parts = []
  for o in objects:
    where = f" {scenes.PHRASES[o.position]}" if o.position and o.position not in o.phrase else ""
    parts.append(percent.grounded_text(o.phrase, [o.box]) + where)
  return " and ".join(parts)


def grounding_turn(objects, caption, rng) -> Turn:
  return Turn(_choice(rng, ("Describe this image in detail.", "Give a grounded caption.")),
              grounded_caption(objects), "[grounding]")


def refer_turn(objects, caption, rng) -> Turn:
  obj = _choice(rng, objects)
  return Turn(f"Where is {obj.phrase}?", percent.box_text(obj.box), "[refer]")


def identify_turn(objects, caption, rng) -> Turn:
  obj = _choice(rng, objects)
  return Turn(f"What is in {percent.box_text(obj.box)}?", obj.phrase, "[identify]")


def _detection_name(obj) -> str:
  """Synthetic shapes by their plural, rendered words as 'words', real objects (count 1,
  `record_objects`) by their phrase."""
  if obj.shape:
    return _plural(obj.shape, 2)
  return obj.phrase if obj.count else "words"


def detection_turn(objects, caption, rng) -> Turn:
  names = {}
  for o in objects:
    names.setdefault(_detection_name(o), []).append(o.box)
  return Turn(", ".join(names), " ".join(percent.grounded_text(n, b) for n, b in names.items()),
              "[detection]")


def instruction_turn(objects, caption, rng) -> Turn:
  question = _choice(rng, ("Describe what you see.", "Tell me about this picture.",
                           "What does this image show?"))
  return Turn(question, f"The image shows {caption}.")


FINE_TURNS = (caption_turn, vqa_turn, grounding_turn, refer_turn, identify_turn,
              detection_turn)


def weak_caption_turn(objects, caption, rng) -> Turn:
  """Weakly labelled captioning: the raw alt-text as the target (LAION / CC style)."""
  return Turn("Briefly describe this image.", caption, "[caption]")


def multi_turn(objects, caption, rng) -> list[Turn]:
  count = int(rng.integers(2, 4))
  return [_choice(rng, FINE_TURNS)(objects, caption, rng) for _ in range(count)]


def _single(fn):
  return lambda objects, caption, rng: [fn(objects, caption, rng)]


# template -> conversation builder (objects, caption, rng) -> [Turn]
BUILDERS = {
    "caption": _single(caption_turn),
    "weak_caption": _single(weak_caption_turn),
    "weak_grounding": _single(grounding_turn),
    "vqa": _single(vqa_turn),
    "grounding": _single(grounding_turn),
    "refer": _single(refer_turn),
    "identify": _single(identify_turn),
    "detection": _single(detection_turn),
    "instruction": _single(instruction_turn),
    "multi_turn": multi_turn,
}
# Templates that need boxes also take grounding records (real boxes); `grounding` comes first
# among them in BUILDERS, so it is the default template of grounding records.
BOX_TEMPLATES = ("grounding", "refer", "identify", "detection")
TEMPLATES = {template: ("pairs", "grounding") if template in BOX_TEMPLATES else ("pairs",)
             for template in BUILDERS}
# Builders that read only the caption: they run on any image-text pair (web alt-text, COCO),
# not just the synthetic scenes whose objects `scene_objects` recovers from the pixels.
CAPTION_ONLY = ("caption", "weak_caption")

# Sample tasks: every template over the synthetic pairs, named minigpt_v2_<template>.
TASKS = tuple(catalog.sample_task(f"minigpt_v2_{t}", "pairs", "webdataset",
                                  catalog.SAMPLE_PAIRS, template=t) for t in BUILDERS)
_FINE = {"minigpt_v2_caption": 0.15, "minigpt_v2_vqa": 0.3, "minigpt_v2_grounding": 0.15,
         "minigpt_v2_refer": 0.15, "minigpt_v2_identify": 0.1, "minigpt_v2_detection": 0.15}
MIXTURES = {name: tuple(rates.items()) for name, rates in {
    "minigpt_v2_stage1": {"minigpt_v2_weak_caption": 0.5, "minigpt_v2_weak_grounding": 0.2,
                          **{k: 0.3 * v for k, v in _FINE.items()}},
    "minigpt_v2_stage2": dict(_FINE),
    "minigpt_v2_stage3": {**{k: 0.6 * v for k, v in _FINE.items()},
                          "minigpt_v2_instruction": 0.2, "minigpt_v2_multi_turn": 0.2},
}.items()}
STAGE_MIXTURES = {1: "minigpt_v2_stage1", 2: "minigpt_v2_stage2", 3: "minigpt_v2_stage3"}

_CAPTION = ("exact_match", "cider", "bleu4")
EVAL_TASKS = (
    catalog.EvalTask("minigpt_v2_caption", "minigpt_v2_caption", metrics=_CAPTION,
                     captions=True),
    catalog.EvalTask("minigpt_v2_vqa", "minigpt_v2_vqa", metrics=("exact_match", "vqa_accuracy")),
    catalog.EvalTask("minigpt_v2_refer", "minigpt_v2_refer", metrics=("exact_match", "iou@0.5")),
    catalog.EvalTask("minigpt_v2_grounding", "minigpt_v2_grounding",
                     metrics=("exact_match", "iou@0.5"), max_new_tokens=40),
)
BOX_FORMAT = percent
# One image and a causal LM per example: rows pack several (config.data.packing).
PACKING = packing.Layout()


# ----------------------------------------------------------------------------------------
# Raw record -> example (the grain pipeline's processor protocol)
# ----------------------------------------------------------------------------------------
def record_objects(raw: dict) -> list:
  """A grounding record's objects (boxes in [0, 1]) as SceneObjects with boxes.percent ints."""
  objects = preprocessors.objects_of(raw)
  if any("<" in phrase or ">" in phrase for phrase, _ in objects):
    raise preprocessors.BadRecord("an object phrase holds '<' or '>' (box text markup)")
  return [scene_objects.SceneObject(phrase, percent.normalise_box(box, 1.0, 1.0), count=1)
          for phrase, box in objects]


def convert(raw: dict, template: str, *, vocab: Vocab, image_size: int, image_tokens: int,
            sequence_length: int, rng: np.random.Generator, loss_weight: float = 1.0,
            resize_mode: str = "stretch") -> dict:
  """One raw image-text record (`image` bytes or pixels, `text`/`meta` caption; a grounding
  record's `objects` for the box templates) -> example dict."""
  if template not in BUILDERS:
    raise ValueError(f"MiniGPT-v2 template {template!r}: expected one of {sorted(BUILDERS)}")
  decoded = preprocessors.decode_image(raw["image"])
  if template not in CAPTION_ONLY and raw.get("objects") is not None:  # real boxes
    objects, caption = record_objects(raw), raw.get("text") or ""
  else:
    caption = preprocessors.caption_of(raw)
    objects = ([] if template in CAPTION_ONLY
               else scene_objects.scene_objects(np.asarray(decoded, np.uint8), caption))
  turns = BUILDERS[template](objects, caption, rng)
  example = encode_conversation(vocab, turns, image_tokens=image_tokens,
                                sequence_length=sequence_length, loss_weight=loss_weight)
  # Boxes are relative to the decoded image; 'stretch' keeps them exact for any aspect.
  image = preprocessors.normalise(preprocessors.resize(decoded, image_size, resize_mode))
  example["images"] = image[None].astype(np.float32)
  example["image_mask"] = np.ones((1,), np.float32)
  return example


class Processor(processor_lib.RecordProcessor):
  """Raw record -> MiniGPT-v2 conversation example of the record's template (held-out
  examples are built as training's)."""

  def convert(self, spec, raw, rng):
    d = self.data_config
    return convert(raw, spec.template, vocab=self.vocab, image_size=d.image_size,
                   image_tokens=d.image_tokens, sequence_length=d.sequence_length, rng=rng,
                   loss_weight=spec.loss_weight, resize_mode=d.resize_mode)


# ----------------------------------------------------------------------------------------
# Benchmarks (`vlm_jax.evaluation.benchmark_eval`): MiniGPT-v2's own evaluation prompts
# ----------------------------------------------------------------------------------------
# The instructions of MiniGPT-v2's released evaluation code (eval_vqa.py, eval_ref.py).
BENCHMARK_PROMPTS = {
    "vqa": "[vqa] Based on the image, respond to this question with a short answer: {}",
    "refer": "[refer] give me the location of {}",
}


def benchmark_prompt(kind: str, text: str) -> str:
  """The instruction (task identifier first) for a benchmark question / expression."""
  if kind not in BENCHMARK_PROMPTS:
    raise ValueError(f"MiniGPT-v2 has no {kind!r} benchmark prompt; it has "
                     f"{sorted(BENCHMARK_PROMPTS)}")
  return BENCHMARK_PROMPTS[kind].format(text)


def benchmark_example(kind: str, image, text: str, data_config, vocab: Vocab):
  """(generation inputs: the chat prompt ending in '[/INST]', stop id) for one image and
  question / expression."""
  task, instruction = split_task(benchmark_prompt(kind, text))
  example = encode_conversation(vocab, [Turn(instruction, "", task)],
                                image_tokens=data_config.image_tokens,
                                sequence_length=data_config.sequence_length, open_last=True)
  pixels = preprocessors.load_image(image, data_config.image_size, data_config.resize_mode)
  example["images"] = pixels[None].astype(np.float32)
  example["image_mask"] = np.ones((1,), np.float32)
  return example, vocab.eos_id
