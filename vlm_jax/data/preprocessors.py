"""Per-example preprocessing: image bytes -> normalised float pixels; raw text -> clean text.

Raising `BadRecord` marks an example to skip and count (see `health.py`); any other
exception is a bug and propagates.
"""
import io
import json
import re
import warnings

import numpy as np
from PIL import Image

# Decompression-bomb guard: images with more pixels than this are skipped, not decoded.
DEFAULT_MAX_PIXELS = 64_000_000


class BadRecord(Exception):
  """An input record that cannot be used (corrupt image, missing caption, ...)."""


def decode_image(data, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
  """Encoded image bytes, or decoded uint8 pixels [H, W, 3|1] / [H, W] (a TFDS or seqio
  example's image), -> RGB."""
  if isinstance(data, np.ndarray):
    if data.dtype != np.uint8 or data.ndim not in (2, 3) or not data.size:
      raise BadRecord(f"image pixels of shape {data.shape} and dtype {data.dtype}: expected "
                      "uint8 [H, W, C]")
    return Image.fromarray(data.squeeze(-1) if data.ndim == 3 and data.shape[-1] == 1
                           else data).convert("RGB")
  if not data:
    raise BadRecord("empty image")
  try:
    image = Image.open(io.BytesIO(data))
    # PIL reads only the header here, so the size check happens before any decoding.
    if image.width * image.height > max_pixels:
      raise BadRecord(f"image of {image.width}x{image.height} exceeds {max_pixels} pixels")
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      image.load()
    return image.convert("RGB")
  except BadRecord:
    raise
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
          Image.DecompressionBombWarning) as e:
    raise BadRecord(f"undecodable image: {e}") from None


def resize(image: Image.Image, size: int, mode: str = "pad") -> Image.Image:
  """Square output. `pad` keeps the whole image (letterbox, grey fill); `crop` fills the
  square with a centre crop; `stretch` ignores the aspect ratio."""
  if mode == "stretch" or image.width == image.height:
    return image.resize((size, size), Image.BICUBIC)
  if mode == "crop":
    side = min(image.width, image.height)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
  if mode == "pad":
    scale = size / max(image.width, image.height)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    canvas = Image.new("RGB", (size, size), (127, 127, 127))
    canvas.paste(image.resize((w, h), Image.BICUBIC), ((size - w) // 2, (size - h) // 2))
    return canvas
  raise ValueError(f"unknown resize mode {mode!r} (pad | crop | stretch)")


def normalise(image: Image.Image) -> np.ndarray:
  """uint8 RGB -> float32 in [-1, 1]."""
  return np.asarray(image, dtype=np.float32) * (2.0 / 255.0) - 1.0


def load_image(data: bytes, size: int, mode: str = "pad",
               max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  return normalise(resize(decode_image(data, max_pixels), size, mode))


_SPACES = re.compile(r"\s+")


def clean_text(text) -> str:
  """Collapses whitespace and strips; an empty result is a bad record."""
  if text is None:
    raise BadRecord("missing text")
  text = _SPACES.sub(" ", text).strip()
  if not text:
    raise BadRecord("empty text")
  return text


def text_from_json_line(line: str, field: str) -> str:
  try:
    value = json.loads(line)[field]
  except (ValueError, KeyError, TypeError) as e:
    raise BadRecord(f"malformed json line: {type(e).__name__}: {e}") from None
  if not isinstance(value, str):
    raise BadRecord(f"field {field!r} is not a string")
  return value


def text_of(record) -> str:
  """A text record's document: its `text`, or the `json_field` of a raw jsonl line."""
  text = record.get("text")
  if record.get("json_field"):
    text = text_from_json_line(text, record["json_field"])
  return clean_text(text)


def objects_of(record) -> list[tuple[str, tuple]]:
  """A grounding record's objects as [(phrase, (x0, y0, x1, y1) in [0, 1])] (records.py);
  malformed or missing ones make it a bad record."""
  objects = record.get("objects") or []
  out = []
  for obj in objects:
    try:
      phrase, box = clean_text(obj["phrase"]), tuple(float(v) for v in obj["box"])
    except (KeyError, TypeError, ValueError) as e:
      raise BadRecord(f"malformed object {obj!r}: {e}") from None
    x0, y0, x1, y1 = box if len(box) == 4 else (1, 1, 0, 0)
    if not 0 <= x0 <= x1 <= 1 or not 0 <= y0 <= y1 <= 1:
      raise BadRecord(f"object box {box} is not (x0, y0, x1, y1) within [0, 1]")
    out.append((phrase, box))
  if not out:
    raise BadRecord("no objects with boxes")
  return out


def caption_of(record) -> str:
  """img2dataset stores the caption in {key}.txt, and again in {key}.json."""
  text = record.get("text")
  if text is None and record.get("meta"):
    try:
      text = json.loads(record["meta"]).get("caption")
    except ValueError:
      text = None
  return clean_text(text)
