"""Synthetic GUI screens and pages of text, with exact element boxes (CogAgent's sample tasks).

Screens (`render_screen`): a title bar with a label, then a grid of cells holding buttons
(filled rounded rectangles with a word), labels (words) and icons (a coloured shape); the
words come from a caption (so screens vary with the data) and the layout from the seeded
generator. Every element's box is the bounding box of the pixels it changed, so boxes are
exact; element names are unique on a screen. Pages (`render_page`): text wrapped onto a
light page.
"""
import dataclasses
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlm_jax.data.synthetic import scenes

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
