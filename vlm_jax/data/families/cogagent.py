"""CogAgent data: the question-answer template, its sample tasks (synthetic GUI screens and
rendered text: OCR and grounding both ways) and captions of real images.

Template (CogVLM's base template, one image, loss only on the answer):

    <s> [boi, P image slots, eoi] Question: {question} Answer: {answer}</s>

The P + 2 slots (`models.cogagent.image_tokens`) are placeholders the model overwrites with
[boi ; low-res visual tokens ; eoi]; `image_positions` gives the first slot.

Templates (a task's `template` field; the low-res image is always the high-res picture
downsampled):

    caption     the record's own image; "Describe the image." -> its caption (the default
                for image-text pairs, e.g. an ingested img2dataset directory)
    ocr         text recognition: the record's caption rendered as a page of text (the
                paper's largest source is synthetic rendering); answer = the rendered text
    refer_gen   referring expression generation on a synthetic GUI screen whose words come
                from the caption (`synthetic.screens`): box -> element ('the "open" button',
                'the text "cold river"', 'a red star icon')
    grounding   referring expression comprehension: element -> [[x0,y0,x1,y1]]

refer_gen and grounding also take grounding records (real boxes: a TFDS grounding dataset,
records.py): the record's own image (stretched to the square, so its [0, 1] boxes stay
exact) and one of its objects (phrase <-> box) instead of a synthetic screen; grounding is
the default template of such records.

Boxes: `boxes.permille` (`[[x0,y0,x1,y1]]`, x1000, three digits). Mixture
`cogagent_pretrain`: OCR 0.4, referring generation 0.3, grounding 0.3.

Batch (one example; the pipeline stacks B of them), `sequence_length` T, `image_tokens` L:

    images          [1, h, h, 3] f32  low-res pixels in [-1, 1] (`image_size`)
    high_res_images [1, H, H, 3] f32  high-res pixels in [-1, 1] (`high_res_image_size`)
    image_mask      [1] f32           1
    tokens          [T] i32           BOS, L slots, prompt, answer, then PAD
    targets         [T] i32           tokens shifted left by one
    loss_mask       [T] f32           1 where the target is an answer token or its EOS
    token_mask      [T] f32           1 for real input tokens (slots included)
    image_positions [1] i32           1 (the first slot follows BOS)
    loss_weight     [] f32            the task's loss weight
"""
import numpy as np
from PIL import Image

from vlm_jax.data import catalog, packing, preprocessors
from vlm_jax.data import processor as processor_lib
from vlm_jax.data.boxes import permille
from vlm_jax.data.synthetic import screens
from vlm_jax.data.vocab import Vocab


# ----------------------------------------------------------------------------------------
# Templates: (record, high-res size, rng) -> (image, question, answer)
# ----------------------------------------------------------------------------------------
def _choice(rng, options):
  return options[int(rng.integers(len(options)))]


def caption_example(raw, size, rng):
  del rng
  image = preprocessors.decode_image(raw["image"]).convert("RGB")
  return image.resize((size, size), Image.BICUBIC), "Describe the image.", \
      preprocessors.caption_of(raw)


def ocr_example(raw, size, rng):
  image, text = screens.render_page(preprocessors.caption_of(raw), size, rng)
  question = _choice(rng, ("What text is written in the image?", "Read the text in the image."))
  return image, question, text


def _screen(raw, size, rng):
  caption = preprocessors.caption_of(raw)
  image, elements = screens.render_screen(size, screens.screen_words(caption, rng), rng)
  if not elements:
    raise preprocessors.BadRecord("screen without elements")
  return image, elements[int(rng.integers(len(elements)))]


def _target(raw, size, rng):
  """(image, phrase, box text) of one object: a grounding record's own, else an element of
  a synthetic screen."""
  if raw.get("objects") is not None:
    objects = preprocessors.objects_of(raw)
    phrase, box = objects[int(rng.integers(len(objects)))]
    image = preprocessors.decode_image(raw["image"]).resize((size, size), Image.BICUBIC)
    return image, phrase, permille.format_box(box, 1.0, 1.0)
  image, element = _screen(raw, size, rng)
  return image, element.name, permille.format_box(element.box, size, size)


def refer_gen_example(raw, size, rng):
  image, phrase, box = _target(raw, size, rng)
  return image, f"What is the element at {box}?", phrase


def grounding_example(raw, size, rng):
  image, phrase, box = _target(raw, size, rng)
  return image, f"Where is {phrase}? Give its box.", box


BUILDERS = {"caption": caption_example, "ocr": ocr_example, "refer_gen": refer_gen_example,
            "grounding": grounding_example}
# grounding before refer_gen: the default template of grounding records.
TEMPLATES = {"caption": ("pairs",), "ocr": ("pairs",), "grounding": ("pairs", "grounding"),
             "refer_gen": ("pairs", "grounding")}
TASKS = tuple(catalog.sample_task(f"cogagent_{t}", "pairs", "webdataset", catalog.SAMPLE_PAIRS,
                                  template=t) for t in ("ocr", "refer_gen", "grounding"))
MIXTURES = {"cogagent_pretrain": (("cogagent_ocr", 0.4), ("cogagent_refer_gen", 0.3),
                                  ("cogagent_grounding", 0.3))}
EVAL_TASKS = (
    catalog.EvalTask("cogagent_grounding", "cogagent_grounding",
                     metrics=("exact_match", "iou@0.5")),
    catalog.EvalTask("cogagent_ocr", "cogagent_ocr"),
)
BOX_FORMAT = permille
# One image (low- and high-res views) per example in a causal LM: rows pack several
# (config.data.packing); both views travel with their example into the row's image slots.
PACKING = packing.Layout(image_keys=("images", "high_res_images", "image_mask"))


# ----------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------
def encode_example(vocab: Vocab, question: str, answer: str, *, image_tokens: int,
                   sequence_length: int, loss_weight: float = 1.0,
                   open_answer: bool = False) -> dict:
  """Token arrays of the batch layout for one question/answer; raises BadRecord if it does
  not fit. open_answer: leave the answer out (a generation prompt ending in 'Answer:')."""
  prompt = vocab.start_ids + [vocab.placeholder_id] * image_tokens + vocab.encode(
      f"Question: {question} Answer:")
  answer_ids = [] if open_answer else vocab.encode(answer) + [vocab.eos_id]
  ids = prompt + answer_ids
  n = len(ids) - 1 if answer_ids else len(ids)  # inputs ids[:-1] predict ids[1:]
  if n > sequence_length:
    raise preprocessors.BadRecord(f"example needs {n} tokens, more than "
                                  f"sequence_length={sequence_length}")
  tokens = np.full((sequence_length,), vocab.pad_id, np.int32)
  targets = np.full((sequence_length,), vocab.pad_id, np.int32)
  tokens[:n] = ids[:n]
  targets[:len(ids) - 1] = ids[1:]
  loss_mask = np.zeros((sequence_length,), np.float32)
  loss_mask[len(prompt) - 1:len(ids) - 1] = 1.0  # targets that are answer tokens / EOS
  token_mask = np.zeros((sequence_length,), np.float32)
  token_mask[:n] = 1.0
  return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask,
          "token_mask": token_mask,
          "image_positions": np.asarray([len(vocab.start_ids)], np.int32),  # after BOS
          "loss_weight": np.float32(loss_weight)}


def images_of(image: Image.Image, image_size: int, high_res_image_size: int) -> dict:
  """The low- and high-res views of one rendered image (both square, [-1, 1])."""
  high = image if image.width == high_res_image_size else image.resize(
      (high_res_image_size, high_res_image_size), Image.BICUBIC)
  low = image.resize((image_size, image_size), Image.BICUBIC)
  return {"images": preprocessors.normalise(low)[None].astype(np.float32),
          "high_res_images": preprocessors.normalise(high)[None].astype(np.float32),
          "image_mask": np.ones((1,), np.float32)}


def convert(raw: dict, template: str, *, vocab: Vocab, image_size: int,
            high_res_image_size: int, image_tokens: int, sequence_length: int,
            rng: np.random.Generator, loss_weight: float = 1.0) -> dict:
  if template not in BUILDERS:
    raise ValueError(f"CogAgent template {template!r}: expected one of {sorted(BUILDERS)}")
  image, question, answer = BUILDERS[template](raw, high_res_image_size, rng)
  example = encode_example(vocab, question, answer, image_tokens=image_tokens,
                           sequence_length=sequence_length, loss_weight=loss_weight)
  example.update(images_of(image, image_size, high_res_image_size))
  return example


class Processor(processor_lib.RecordProcessor):
  """Raw record -> CogAgent example of the record's template (held-out examples are built
  as training's)."""

  def convert(self, spec, raw, rng):
    d = self.data_config
    return convert(raw, spec.template, vocab=self.vocab, image_size=d.image_size,
                   high_res_image_size=d.high_res_image_size, image_tokens=d.image_tokens,
                   sequence_length=d.sequence_length, rng=rng, loss_weight=spec.loss_weight)


# ----------------------------------------------------------------------------------------
# Benchmarks (`vlm_jax.evaluation.family_benchmarks`): CogVLM / CogAgent's own prompts
# ----------------------------------------------------------------------------------------
# The question inside the template's `Question: ... Answer:` (CogVLM's VQA template; its
# referring-expression prompt, answered in `permille` boxes).
BENCHMARK_PROMPTS = {"vqa": "{}", "refer": "Where is {}? answer in [[x0,y0,x1,y1]] format."}


def benchmark_prompt(kind: str, text: str) -> str:
  if kind not in BENCHMARK_PROMPTS:
    raise ValueError(f"CogAgent has no {kind!r} benchmark prompt; it has "
                     f"{sorted(BENCHMARK_PROMPTS)}")
  return BENCHMARK_PROMPTS[kind].format(text)


def benchmark_example(kind: str, image, text: str, data_config, vocab: Vocab):
  """(generation inputs `<s> [image slots] Question: ... Answer:`, stop id EOS); the image
  is stretched to the squares, so boxes relative to it stay exact."""
  example = encode_example(vocab, benchmark_prompt(kind, text), "",
                           image_tokens=data_config.image_tokens,
                           sequence_length=data_config.sequence_length, open_answer=True)
  example.update(images_of(preprocessors.decode_image(image), data_config.image_size,
                           data_config.high_res_image_size))
  return example, vocab.eos_id
