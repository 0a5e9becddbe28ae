"""Box text `{<x1><y1><x2><y2>}` with integer coordinates in 0..100 (MiniGPT-v2's).

Pixel coordinates map to ints by truncation, int(coord / size * 100), as the reference code
does; (x1, y1) is the top-left and (x2, y2) the bottom-right corner. Several boxes of one
phrase are joined by `<delim>`; a grounded phrase is written `<p>phrase</p>{...}`.

Parsing is strict: anything that is not exactly the format, a coordinate outside 0..100, or
a corner order with x1 > x2 or y1 > y2 raises `BoxFormatError` naming the offending text.
"""
import re

from vlm_jax.data.boxes import BoxFormatError

BOX_RANGE = 100
DELIM = "<delim>"
_BOX = re.compile(r"\{<(-?\d+)><(-?\d+)><(-?\d+)><(-?\d+)>\}")
_GROUNDED = re.compile(r"<p>(.*?)</p>\s*((?:\{[^{}]*\}(?:\s*<delim>\s*)?)+)")


def _check(box, what):
  if len(box) != 4:
    raise BoxFormatError(f"{what}: expected 4 coordinates (x1, y1, x2, y2), got {box!r}")
  x1, y1, x2, y2 = box
  for v in box:
    if not 0 <= v <= BOX_RANGE:
      raise BoxFormatError(f"{what}: coordinate {v} outside 0..{BOX_RANGE} in {box!r}")
  if x1 > x2 or y1 > y2:
    raise BoxFormatError(f"{what}: corners out of order (need x1 <= x2, y1 <= y2) in {box!r}")
  return tuple(int(v) for v in box)


def normalise_box(box, width: float, height: float) -> tuple[int, int, int, int]:
  """Pixel box (x1, y1, x2, y2) in an image of `width` x `height` -> ints in 0..100."""
  if width <= 0 or height <= 0:
    raise BoxFormatError(f"image size {width}x{height} must be positive")
  x1, y1, x2, y2 = box
  for v, size, name in ((x1, width, "x1"), (y1, height, "y1"), (x2, width, "x2"),
                        (y2, height, "y2")):
    if not 0 <= v <= size:
      raise BoxFormatError(f"pixel {name}={v} outside the image (0..{size}) in {tuple(box)!r}")
  return _check((int(x1 / width * BOX_RANGE), int(y1 / height * BOX_RANGE),
                 int(x2 / width * BOX_RANGE), int(y2 / height * BOX_RANGE)), "pixel box")


def box_text(box) -> str:
  """(x1, y1, x2, y2) ints in 0..100 -> '{<x1><y1><x2><y2>}'."""
  x1, y1, x2, y2 = _check(tuple(box), "box")
  return f"{{<{x1}><{y1}><{x2}><{y2}>}}"


def format_box(box, width: float, height: float) -> str:
  """Pixel box -> box text (truncating to 0..100)."""
  return box_text(normalise_box(box, width, height))


def parse_box(text: str) -> tuple[int, int, int, int]:
  """Exactly one box text (surrounding whitespace allowed) -> (x1, y1, x2, y2)."""
  match = _BOX.fullmatch(text.strip())
  if not match:
    raise BoxFormatError(f"not a box {{<x1><y1><x2><y2>}}: {text!r}")
  return _check(tuple(int(g) for g in match.groups()), f"box {text.strip()!r}")


def parse_boxes(text: str) -> list[tuple[int, int, int, int]]:
  """One or more boxes joined by '<delim>' (a [refer] / detection answer)."""
  if not text.strip():
    raise BoxFormatError("empty box text")
  return [parse_box(p) for p in text.split(DELIM)]


def grounded_text(phrase: str, boxes) -> str:
  """'<p>phrase</p>{box}<delim>{box}' for ints boxes."""
  if not phrase or "<" in phrase or ">" in phrase:
    raise BoxFormatError(f"phrase {phrase!r} must be non-empty and free of '<' / '>'")
  return f"<p>{phrase}</p>" + DELIM.join(box_text(b) for b in boxes)


def find_boxes(text: str) -> list[tuple[int, int, int, int]]:
  """Every box '{<x1><y1><x2><y2>}' in free text (e.g. a generated answer), in order."""
  return [parse_box(m.group(0)) for m in _BOX.finditer(text)]


def parse_grounded(text: str) -> list[tuple[str, list[tuple[int, int, int, int]]]]:
  """Every '<p>phrase</p>{box}(<delim>{box})*' in `text`, in order. Raises if a <p> tag
  is not followed by well-formed boxes."""
  found = [(m.group(1).strip(), parse_boxes(m.group(2).strip()))
           for m in _GROUNDED.finditer(text)]
  if text.count("<p>") != len(found):
    raise BoxFormatError(f"{text.count('<p>')} <p> tag(s) but {len(found)} well-formed "
                         f"grounded phrase(s) in {text!r}")
  return found


def pixel_box(box, width: float, height: float) -> tuple[float, float, float, float]:
  """Ints in 0..100 -> pixel coordinates (the lower edge of each truncation bin)."""
  x1, y1, x2, y2 = _check(tuple(box), "box")
  s = 1.0 / BOX_RANGE
  return (x1 * s * width, y1 * s * height, x2 * s * width, y2 * s * height)
