"""CogAgent data: synthetic GUI screens and rendered text; OCR and grounding both ways.

Template (CogVLM's base template, one image, loss only on the answer):

    <s> [boi, P image slots, eoi] Question: {question} Answer: {answer}</s>

The P + 2 slots (`models.cogagent.image_tokens`) are placeholders the model overwrites with
[boi ; low-res visual tokens ; eoi]; `image_positions` gives the first slot.

Tasks (catalog names; each reads the shipped synthetic image-text pairs and renders a new
image at `high_res_image_size`; the low-res image is the same picture downsampled):

    cogagent_ocr          text recognition: the record's caption rendered as a page of
                          text (the paper's largest source is synthetic rendering);
                          answer = the rendered text
    cogagent_refer_gen    referring expression generation on a GUI screen: box -> element
                          ('the "open" button', 'the text "cold river"', 'a red star icon')
    cogagent_grounding    referring expression comprehension: element -> [[x0,y0,x1,y1]]

Screens (`render_screen`): a title bar with a label, then a grid of cells holding buttons
(filled rounded rectangles with a word), labels (words) and icons (a coloured shape); the
words come from the record's caption (so screens vary with the data) and the layout from
the example's seeded generator. Every element's box is the bounding box of the pixels it
changed, so boxes are exact; element names are unique on a screen. Boxes are written by
`vlm_jax.data.cogagent_boxes` (`[[x0,y0,x1,y1]]`, x1000, three digits).

Mixture `cogagent_pretrain`: OCR 0.4, referring generation 0.3, grounding 0.3.

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

Training: `config.data.converter = 'cogagent'` (see `vlm_jax.data.pipeline.CONVERTERS`).
"""
import dataclasses
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlm_jax.data import catalog, cogagent_boxes, preprocessors, scenes, synthetic
from vlm_jax.data import processor as processor_lib
from vlm_jax.data.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Vocab

PLACEHOLDER_ID = UNK_ID  # any id: the model overwrites the slots' embeddings
_FONTS = {}


def _font(size: int):
  if size not in _FONTS:
    _FONTS[size] = ImageFont.load_default(size=size)
  return _FONTS[size]


def _changed_box(before: np.ndarray, image: Image.Image, region):
  """Bounding box (pixels, exclusive right/bottom) of what changed inside region."""
  x0, y0, x1, y1 = region
  after = np.asarray(image.crop(region), np.int32)
  ys, xs = np.nonzero(np.abs(after - before).max(axis=-1) > 0)
  if not len(xs):
    return None
  return (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1,
          y0 + int(ys.max()) + 1)


# ----------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Element:
  kind: str  # button | label | icon
  text: str  # the words shown; for an icon, "<colour> <shape>"
  box: tuple[int, int, int, int]  # pixels (x0, y0, x1, y1), right/bottom exclusive

  @property
  def name(self) -> str:
    if self.kind == "button":
      return f'the "{self.text}" button'
    if self.kind == "label":
      return f'the text "{self.text}"'
    return f"a {self.text} icon"


def screen_words(caption: str, rng: np.random.Generator) -> list[str]:
  """Distinct words for a screen, in the order used: the caption's, then the shared word
  list, each shuffled."""
  words = [w for w in dict.fromkeys(caption.lower().split()) if w.isalpha() and len(w) > 2
           and w not in ("the", "and")]
  rest = [w for w in scenes.WORDS if w not in words]
  return ([words[i] for i in rng.permutation(len(words))]
          + [rest[i] for i in rng.permutation(len(rest))])


def render_screen(size: int, words, rng: np.random.Generator, rows: int = 3, cols: int = 2):
  """A synthetic GUI screen (size x size) and its elements with exact pixel boxes; texts
  are taken from `words` in order (at most 1 + rows * cols, distinct)."""
  background = tuple(int(v) for v in rng.integers(225, 256, 3))
  image = Image.new("RGB", (size, size), background)
  draw = ImageDraw.Draw(image)
  font = _font(max(8, size // 12))
  next_word = iter(words)
  elements = []

  def place(kind, region, paint):
    before = np.asarray(image.crop(region), np.int32)
    text = paint(region)
    box = _changed_box(before, image, region)
    if box is not None:
      elements.append(Element(kind, text, box))

  bar = int(size * 0.14)
  draw.rectangle((0, 0, size, bar), fill=tuple(int(v) for v in rng.integers(60, 140, 3)))

  def title(region):
    text = next(next_word)
    draw.text((region[0] + 2, region[1] + 1), text, fill=(255, 255, 255), font=font)
    return text

  place("label", (0, 0, size, bar), title)
  icons = set()
  cell_w, cell_h = size / cols, (size - bar) / rows
  for r in range(rows):
    for c in range(cols):
      region = (int(c * cell_w), int(bar + r * cell_h), int((c + 1) * cell_w),
                int(bar + (r + 1) * cell_h))
      kind = ("button", "label", "icon", None)[int(rng.choice(4, p=(0.35, 0.3, 0.25, 0.1)))]
      if kind is None:
        continue
      if kind == "icon":
        colour, shape = str(rng.choice(list(scenes.COLOURS))), str(rng.choice(scenes.SHAPES))
        if (colour, shape) in icons:
          continue
        icons.add((colour, shape))

        def icon(region, colour=colour, shape=shape):
          x0, y0, x1, y1 = region
          radius = min(x1 - x0, y1 - y0) * rng.uniform(0.2, 0.35)
          cx = rng.uniform(x0 + radius + 1, x1 - radius - 1)
          scenes.draw_shape(draw, shape, cx, (y0 + y1) / 2, radius, scenes.COLOURS[colour])
          return f"{colour} {shape}"
        place("icon", region, icon)
        continue
      text = next(next_word)

      def widget(region, text=text, kind=kind):
        x0, y0, x1, y1 = region
        width = min(draw.textlength(text, font=font), x1 - x0 - 8)
        left = x0 + 3 + rng.uniform(0, max(0.0, x1 - x0 - 8 - width))
        top = (y0 + y1) / 2 - font.size / 2
        if kind == "button":
          fill = tuple(int(v) for v in rng.integers(40, 160, 3))
          draw.rounded_rectangle((left - 2, top - 2, left + width + 2, top + font.size + 3),
                                 radius=3, fill=fill)
          draw.text((left, top), text, fill=(255, 255, 255), font=font)
        else:
          draw.text((left, top), text, fill=(0, 0, 0), font=font)
        return text
      place(kind, region, widget)
  return image, elements


def render_page(text: str, size: int, rng: np.random.Generator):
  """Text wrapped onto a light page; returns (image, the text that fits, words in order)."""
  shade = int(rng.integers(225, 256))
  image = Image.new("RGB", (size, size), (shade, shade, shade))
  draw = ImageDraw.Draw(image)
  font = _font(max(8, size // 10))
  chars = max(4, int((size - 6) / max(1.0, draw.textlength("abcdefgh", font=font) / 8)))
  lines = textwrap.wrap(text, chars)
  fits = max(1, (size - 4) // (font.size + 2))
  lines = lines[:fits]
  top = rng.uniform(1, max(1.0, size - len(lines) * (font.size + 2) - 1))
  for i, line in enumerate(lines):
    left = rng.uniform(1, max(1.0, size - draw.textlength(line, font=font) - 1))
    draw.text((left, top + i * (font.size + 2)), line, fill=(0, 0, 0), font=font)
  return image, " ".join(lines)


# ----------------------------------------------------------------------------------------
# Tasks: record -> (image, question, answer)
# ----------------------------------------------------------------------------------------
def _choice(rng, options):
  return options[int(rng.integers(len(options)))]


def ocr_example(caption, size, rng):
  image, text = render_page(caption, size, rng)
  question = _choice(rng, ("What text is written in the image?", "Read the text in the image."))
  return image, question, text


def _screen(caption, size, rng):
  image, elements = render_screen(size, screen_words(caption, rng), rng)
  if not elements:
    raise preprocessors.BadRecord("screen without elements")
  return image, elements, elements[int(rng.integers(len(elements)))]


def refer_gen_example(caption, size, rng):
  image, _, element = _screen(caption, size, rng)
  box = cogagent_boxes.format_box(element.box, size, size)
  return image, f"What is the element at {box}?", element.name


def grounding_example(caption, size, rng):
  image, _, element = _screen(caption, size, rng)
  return (image, f"Where is {element.name}? Give its box.",
          cogagent_boxes.format_box(element.box, size, size))


TASKS = {"cogagent_ocr": ocr_example, "cogagent_refer_gen": refer_gen_example,
         "cogagent_grounding": grounding_example}
MIXTURES = {"cogagent_pretrain": {"cogagent_ocr": 0.4, "cogagent_refer_gen": 0.3,
                                  "cogagent_grounding": 0.3}}


def register_catalog():
  for name in TASKS:
    if name not in catalog.TASKS:
      catalog.add_task(catalog.TaskSpec(name, "pairs", "webdataset",
                                        f"{synthetic.SUBDIR}/pairs/{{split}}/*.tar",
                                        synthetic=True))
  for name, rates in MIXTURES.items():
    if name not in catalog.MIXTURES:
      catalog.add_mixture(catalog.MixtureSpec(name, tuple(rates.items())))


register_catalog()


# ----------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------
def encode_example(vocab: Vocab, question: str, answer: str, *, image_tokens: int,
                   sequence_length: int, loss_weight: float = 1.0,
                   open_answer: bool = False) -> dict:
  """Token arrays of the batch layout for one question/answer; raises BadRecord if it does
  not fit. open_answer: leave the answer out (a generation prompt ending in 'Answer:')."""
  prompt = [BOS_ID] + [PLACEHOLDER_ID] * image_tokens + vocab.encode(
      f"Question: {question} Answer:")
  answer_ids = [] if open_answer else vocab.encode(answer) + [EOS_ID]
  ids = prompt + answer_ids
  n = len(ids) - 1 if answer_ids else len(ids)  # inputs ids[:-1] predict ids[1:]
  if n > sequence_length:
    raise preprocessors.BadRecord(f"example needs {n} tokens, more than "
                                  f"sequence_length={sequence_length}")
  tokens = np.full((sequence_length,), PAD_ID, np.int32)
  targets = np.full((sequence_length,), PAD_ID, np.int32)
  tokens[:n] = ids[:n]
  targets[:len(ids) - 1] = ids[1:]
  loss_mask = np.zeros((sequence_length,), np.float32)
  loss_mask[len(prompt) - 1:len(ids) - 1] = 1.0  # targets that are answer tokens / EOS
  token_mask = np.zeros((sequence_length,), np.float32)
  token_mask[:n] = 1.0
  return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask,
          "token_mask": token_mask, "image_positions": np.asarray([1], np.int32),
          "loss_weight": np.float32(loss_weight)}


def images_of(image: Image.Image, image_size: int, high_res_image_size: int) -> dict:
  """The low- and high-res views of one rendered image (both square, [-1, 1])."""
  high = image if image.width == high_res_image_size else image.resize(
      (high_res_image_size, high_res_image_size), Image.BICUBIC)
  low = image.resize((image_size, image_size), Image.BICUBIC)
  return {"images": preprocessors.normalise(low)[None].astype(np.float32),
          "high_res_images": preprocessors.normalise(high)[None].astype(np.float32),
          "image_mask": np.ones((1,), np.float32)}


def convert(raw: dict, task: str, *, vocab: Vocab, image_size: int, high_res_image_size: int,
            image_tokens: int, sequence_length: int, rng: np.random.Generator,
            loss_weight: float = 1.0) -> dict:
  if task not in TASKS:
    raise ValueError(f"CogAgent task {task!r}: expected one of {sorted(TASKS)}")
  caption = preprocessors.caption_of(raw)
  image, question, answer = TASKS[task](caption, high_res_image_size, rng)
  example = encode_example(vocab, question, answer, image_tokens=image_tokens,
                           sequence_length=sequence_length, loss_weight=loss_weight)
  example.update(images_of(image, image_size, high_res_image_size))
  return example


class ExampleProcessor(processor_lib.RecordProcessor):
  """Raw record -> CogAgent example of the record's task."""

  def __init__(self, data_config, seed):
    super().__init__(seed)
    self.vocab = Vocab(data_config.vocab_path)
    self.image_size = data_config.image_size
    self.high_res_image_size = data_config.high_res_image_size
    self.image_tokens = data_config.image_tokens
    self.sequence_length = data_config.sequence_length

  def convert(self, spec, raw, rng):
    return convert(raw, spec.name, vocab=self.vocab, image_size=self.image_size,
                   high_res_image_size=self.high_res_image_size, image_tokens=self.image_tokens,
                   sequence_length=self.sequence_length, rng=rng, loss_weight=spec.loss_weight)
