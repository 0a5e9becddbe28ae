"""Box text `[[x0,y0,x1,y1]]`, coordinates x1000, three digits (CogAgent's / CogVLM's).

A pixel coordinate v in an image of size s maps to min(999, int(v / s * 1000)), written
zero-padded to three digits (000..999); (x0, y0) is the top-left and (x1, y1) the
bottom-right corner. Several boxes of one object are joined by ';' inside the outer
brackets: `[[x0,y0,x1,y1];[x0,y0,x1,y1]]`.

Parsing is strict (same rules and error type as `percent.py`): anything that is
not exactly the format (three digits per coordinate, no spaces), a coordinate outside
000..999, or corners out of order raises `BoxFormatError` naming the offending text.
"""
import re

from vlm_jax.data.boxes import BoxFormatError

BOX_SCALE = 1000  # coordinates are in 0 .. BOX_SCALE - 1
_COORD = r"(\d{3})"
_ONE = r"\[" + ",".join([_COORD] * 4) + r"\]"
_BOXES = re.compile(r"\[(" + _ONE + r"(?:;" + _ONE + r")*)\]")
_FIND = re.compile(r"\[\[[^\[\]]*\](?:;\[[^\[\]]*\])*\]")

__all__ = ["BoxFormatError", "normalise_box", "box_text", "format_box", "parse_boxes",
           "find_boxes", "pixel_box"]


def _check(box, what):
  if len(box) != 4:
    raise BoxFormatError(f"{what}: expected 4 coordinates (x0, y0, x1, y1), got {box!r}")
  for v in box:
    if int(v) != v or not 0 <= v < BOX_SCALE:
      raise BoxFormatError(f"{what}: coordinate {v} is not an integer in 0..{BOX_SCALE - 1} "
                           f"in {box!r}")
  x0, y0, x1, y1 = box
  if x0 > x1 or y0 > y1:
    raise BoxFormatError(f"{what}: corners out of order (need x0 <= x1, y0 <= y1) in {box!r}")
  return tuple(int(v) for v in box)


def normalise_box(box, width: float, height: float) -> tuple[int, int, int, int]:
  """Pixel box (x0, y0, x1, y1) in an image of `width` x `height` -> ints in 0..999."""
  if width <= 0 or height <= 0:
    raise BoxFormatError(f"image size {width}x{height} must be positive")
  if len(box) != 4:
    raise BoxFormatError(f"pixel box: expected 4 coordinates, got {tuple(box)!r}")
  scaled = []
  for v, size, name in zip(box, (width, height, width, height), ("x0", "y0", "x1", "y1")):
    if not 0 <= v <= size:
      raise BoxFormatError(f"pixel {name}={v} outside the image (0..{size}) in {tuple(box)!r}")
    scaled.append(min(BOX_SCALE - 1, int(v / size * BOX_SCALE)))
  return _check(tuple(scaled), "pixel box")


def box_text(boxes) -> str:
  """One box (x0, y0, x1, y1) or a list of boxes, ints in 0..999 -> '[[x0,y0,x1,y1]]'."""
  if len(boxes) and not hasattr(boxes[0], "__len__"):
    boxes = [boxes]
  if not len(boxes):
    raise BoxFormatError("box_text needs at least one box")
  checked = [_check(tuple(b), "box") for b in boxes]
  return "[" + ";".join("[" + ",".join(f"{v:03d}" for v in b) + "]" for b in checked) + "]"


def format_box(box, width: float, height: float) -> str:
  """Pixel box -> '[[x0,y0,x1,y1]]'."""
  return box_text(normalise_box(box, width, height))


def parse_boxes(text: str) -> list[tuple[int, int, int, int]]:
  """Exactly one box text (surrounding whitespace allowed) -> its boxes, in order."""
  stripped = text.strip()
  if not _BOXES.fullmatch(stripped):
    raise BoxFormatError(f"not a box [[x0,y0,x1,y1]] (three digits each, ';' between "
                         f"boxes): {text!r}")
  return [_check(tuple(int(v) for v in part.split(",")), f"box {stripped!r}")
          for part in stripped[2:-2].split("];[")]


def find_boxes(text: str) -> list[tuple[int, int, int, int]]:
  """Every box of every group '[[...]]' in free text (e.g. a generated answer), in order,
  parsed strictly."""
  return [box for m in _FIND.finditer(text) for box in parse_boxes(m.group(0))]


def pixel_box(box, width: float, height: float) -> tuple[float, float, float, float]:
  """Ints in 0..999 -> pixel coordinates (the lower edge of each bin)."""
  x0, y0, x1, y1 = _check(tuple(box), "box")
  s = 1.0 / BOX_SCALE
  return (x0 * s * width, y0 * s * height, x1 * s * width, y1 * s * height)
