"""A small grammar of drawable scenes and the sentences that describe them.

Scenes are groups of identical shapes ("two red circles on the left"); a tiny model can learn
the mapping in minutes because every word of the caption is visible in the image. The same
grammar writes the text-only documents, so the text PrefixLM and captioning share a language.
"""
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlm_jax.data import preprocessors

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 200, 30), "purple": (140, 60, 170), "orange": (245, 130, 20),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
# Region of each position as (x0, y0, x1, y1) fractions of the canvas. Two groups in one
# scene use opposite regions so they never overlap.
REGIONS = {
    "left": (0.0, 0.05, 0.4, 0.95), "right": (0.6, 0.05, 1.0, 0.95),
    "top": (0.05, 0.0, 0.95, 0.4), "bottom": (0.05, 0.6, 0.95, 1.0),
    "centre": (0.2, 0.2, 0.8, 0.8),
}
PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
           "bottom": "at the bottom", "centre": "in the centre"}
LAYOUTS = (("left",), ("right",), ("top",), ("bottom",), ("centre",),
           ("left", "right"), ("top", "bottom"))

# Words drawn as text images and used by the simple sentences of text documents.
WORDS = (
    "cat dog bird fish horse cow tree house car boat train plane sun moon star river hill "
    "road city park garden book pen cup chair table door window apple bread milk water "
    "happy small big old new fast slow warm cold bright dark quiet loud green light "
    "runs sleeps eats reads sings swims flies walks jumps sits stands looks finds "
    "hello world good morning open close stop go yes no exit enter north south east west"
).split()
SUBJECTS = ("the cat", "a dog", "the bird", "my friend", "the child", "a farmer", "the teacher")
VERBS = ("sees", "likes", "finds", "draws", "paints", "counts", "holds")
OBJECTS = ("the red ball", "a small house", "two green trees", "the old book",
           "a blue boat", "three yellow stars", "the big car")


def _plural(shape, count):
  return shape + ("s" if count > 1 else "")


def describe(groups):
  """Caption of a scene: groups are (count, colour, shape, position) tuples."""
  return " and ".join(f"{COUNT_WORDS[n]} {c} {_plural(s, n)} {PHRASES[p]}"
                      for n, c, s, p in groups)


def sample_scene(rng: np.random.Generator):
  layout = LAYOUTS[rng.integers(len(LAYOUTS))]
  return [(int(rng.integers(1, 4)), str(rng.choice(list(COLOURS))),
           str(rng.choice(SHAPES)), position) for position in layout]


def draw_shape(draw, shape, cx, cy, r, fill):
  if shape == "circle":
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
  elif shape == "square":
    draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
  elif shape == "triangle":
    draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
  elif shape == "diamond":
    draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
  elif shape == "star":
    angles = np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
    draw.polygon([(cx + q * np.cos(a), cy - q * np.sin(a)) for q, a in zip(radii, angles)],
                 fill=fill)
  else:
    raise ValueError(f"unknown shape {shape!r}")


def shape_placements(groups, size: int, rng: np.random.Generator):
  """(shape, colour, cx, cy, radius) of every shape of a scene, in drawing order; draws from
  `rng` exactly as render_scene does, so a copy of its generator reproduces the geometry."""
  for count, colour, shape, position in groups:
    x0, y0, x1, y1 = (v * size for v in REGIONS[position])
    horizontal = (x1 - x0) >= (y1 - y0)
    step = ((x1 - x0) if horizontal else (y1 - y0)) / count
    cell = min(step, (y1 - y0) if horizontal else (x1 - x0))
    for i in range(count):
      cx = x0 + (i + 0.5) * step if horizontal else (x0 + x1) / 2
      cy = (y0 + y1) / 2 if horizontal else y0 + (i + 0.5) * step
      r = cell * rng.uniform(0.28, 0.4)
      jitter = cell * 0.08
      x = cx + rng.uniform(-jitter, jitter)
      yield shape, colour, x, cy + rng.uniform(-jitter, jitter), r


def render_scene(groups, size: int, rng: np.random.Generator) -> Image.Image:
  shade = int(rng.integers(235, 256))
  image = Image.new("RGB", (size, size), (shade, shade, shade))
  draw = ImageDraw.Draw(image)
  for shape, colour, x, y, r in shape_placements(groups, size, rng):
    draw_shape(draw, shape, x, y, r, COLOURS[colour])
  return image


def sample_words(rng: np.random.Generator) -> str:
  return " ".join(rng.choice(WORDS, size=int(rng.integers(1, 4))))


_FONTS = {}


def render_text(text: str, size: int, rng: np.random.Generator) -> Image.Image:
  """Black words on a light background, wrapped one word per line when too wide."""
  font_size = max(8, size // 6)
  if font_size not in _FONTS:
    _FONTS[font_size] = ImageFont.load_default(size=font_size)
  font = _FONTS[font_size]
  shade = int(rng.integers(225, 256))
  image = Image.new("RGB", (size, size), (shade, shade, shade))
  draw = ImageDraw.Draw(image)
  lines = [text] if draw.textlength(text, font=font) < size - 4 else text.split()
  top = (size - len(lines) * (font_size + 2)) / 2 + rng.uniform(-2, 2)
  for i, line in enumerate(lines):
    left = max(1, (size - draw.textlength(line, font=font)) / 2 + rng.uniform(-2, 2))
    draw.text((left, top + i * (font_size + 2)), line, fill=(0, 0, 0), font=font)
  return image


def sample_sentence(rng: np.random.Generator) -> str:
  kind = rng.integers(3)
  if kind == 0:
    return "the picture shows " + describe(sample_scene(rng)) + "."
  if kind == 1:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."
  return f"the word {sample_words(rng)} is written here."


def sample_document(rng: np.random.Generator) -> str:
  return " ".join(sample_sentence(rng) for _ in range(int(rng.integers(2, 6))))


# ----------------------------------------------------------------------------------------
# Reading captions back (evaluation tasks on the sample data)
# ----------------------------------------------------------------------------------------
def caption(raw: dict) -> str:
  return preprocessors.caption_of(raw) or ""


def is_scene(raw: dict) -> bool:
  """The record is a scene (not rendered words)."""
  return any(shape in caption(raw) for shape in SHAPES)


def single_shape(raw: dict) -> str | None:
  """The shape of a one-group scene, else None."""
  text = caption(raw)
  found = [s for s in SHAPES if s in text]
  return found[0] if len(found) == 1 and " and " not in text else None


# Zero-shot classification of one-group scenes by shape (catalog.EvalTask fields).
ZERO_SHOT_SHAPES = dict(classes=SHAPES, class_prompt="a photo of a {}", label=single_shape,
                        keep=lambda raw: single_shape(raw) is not None)
