"""Examples of a TFDS dataset or a seqio task -> the raw records family processors read.

Processors read the record shapes of `records.py`: `pairs` {image, text}, `grounding`
{image, objects, text (optional)}, `text` {text}, `interleaved` {texts, images}. An
example's features map onto them by name (nested features flattened with '/'); a mixture
entry's `fields` renames (`fields={'text': 'captions/text'}`):

  record field  feature (first present)       value
  image         image                         encoded bytes, or uint8 pixels [H, W, 3]
  text          text, caption, targets        a string (a list of strings: its first)
  objects       objects/bbox, objects/phrase  TFDS BBox rows (ymin, xmin, ymax, xmax) in
                                              [0, 1], one phrase per box -> objects
                                              [{'phrase', 'box': (x0, y0, x1, y1)}]
  texts, images texts, images                 aligned lists; '' / empty bytes = nothing

A seqio feature `f` tokenized by `seqio.preprocessors.tokenize` keeps its text as
`f_pretokenized`, which is read first; plain token ids are decoded with the task's
vocabulary for `f`. The kind of record follows from the features present (`infer_kind`):
texts + images -> interleaved; image + boxes -> grounding; image -> pairs; text -> text.
"""
import numpy as np

DEFAULT_FIELDS = {"image": ("image",), "text": ("text", "caption", "targets"),
                  "bbox": ("objects/bbox",), "phrase": ("objects/phrase", "objects/text"),
                  "texts": ("texts",), "images": ("images",)}
PRETOKENIZED = "_pretokenized"


def flatten(example, prefix: str = "") -> dict:
  """{'a': {'b': x}} -> {'a/b': x}."""
  out = {}
  for key, value in example.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}/"))
    else:
      out[f"{prefix}{key}"] = value
  return out


def field_map(names, fields: dict) -> dict:
  """{record field: feature name} for the features `names` has (renamed by `fields`)."""
  names = set(names)
  out = {}
  for field, defaults in DEFAULT_FIELDS.items():
    candidates = (fields[field],) if field in fields else defaults
    found = [c for c in candidates if c in names or c + PRETOKENIZED in names]
    if found:
      out[field] = found[0]
  return out


def infer_kind(names, fields: dict) -> str | None:
  present = field_map(names, fields)
  if "texts" in present and "images" in present:
    return "interleaved"
  if "image" in present:
    return "grounding" if "bbox" in present and "phrase" in present else "pairs"
  return "text" if "text" in present else None


def _string(value, decode=None):
  """bytes / str / a list of them (the first) / token ids (with `decode`) -> str or None."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, bytes):
    return value.decode("utf-8", "replace")
  array = np.asarray(value)
  if array.dtype.kind in "SUO":
    return _string(array.reshape(-1)[0]) if array.size else None
  if decode is None:
    raise ValueError("token ids without a vocabulary to decode them")
  return decode([int(i) for i in array.reshape(-1) if i > 0])


def _media(value):
  """Encoded bytes or pixels; empty -> None."""
  if value is None or (isinstance(value, bytes) and not value) or np.size(value) == 0:
    return None
  return value


class RecordMaker:
  """fn(example, index) -> raw record of `kind` (picklable when `decoders` are)."""

  def __init__(self, kind: str, names, fields: dict, source: str, decoders=None):
    self.kind, self.source = kind, source
    self.fields = field_map(names, fields)
    self.decoders = decoders or {}

  def _text(self, example, field):
    name = self.fields.get(field)
    if name is None:
      return None
    if name + PRETOKENIZED in example:
      return _string(example[name + PRETOKENIZED])
    return _string(example.get(name), self.decoders.get(name))

  def _objects(self, example):
    boxes = np.asarray(example[self.fields["bbox"]], np.float64).reshape(-1, 4)
    phrases = np.asarray(example[self.fields["phrase"]]).reshape(-1)
    if len(phrases) != len(boxes):
      raise ValueError(f"{len(boxes)} boxes but {len(phrases)} phrases")
    return [{"phrase": _string(p), "box": [float(x0), float(y0), float(x1), float(y1)]}
            for (y0, x0, y1, x1), p in zip(boxes, phrases)]

  def __call__(self, example, index: int) -> dict:
    example = flatten(example)
    record = {"source": self.source, "key": f"#{index}", "kind": self.kind, "meta": None}
    try:
      if self.kind == "interleaved":
        texts = [_string(t) or None for t in example[self.fields["texts"]]]
        images = [_media(i) for i in example[self.fields["images"]]]
        return {**record, "texts": texts, "images": images}
      record["text"] = self._text(example, "text")
      record["image"] = _media(example[self.fields["image"]]) if "image" in self.fields \
          else None
      if self.kind == "grounding":
        record["objects"] = self._objects(example)
    except (KeyError, ValueError, TypeError) as e:
      record["problem"] = f"unusable example: {type(e).__name__}: {e}"
    return record
