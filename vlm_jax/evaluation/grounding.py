"""Grounding accuracy: the first box parsed from generated text has IoU >= 0.5 with the truth.

Boxes are read in the family's box format (a `data/boxes/` module: `percent` for
`{<x1><y1><x2><y2>}`, `permille` for `[[x0,y0,x1,y1]]`). IoU is computed in the format's
own integer coordinates (both boxes are in the same normalised space); text without a
well-formed box scores 0.
"""
from vlm_jax.data.boxes import BoxFormatError


def iou(a, b) -> float:
  """Intersection over union of two (x0, y0, x1, y1) boxes (0 if both are empty)."""
  ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = ix * iy
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


def first_box(text: str, box_format):
  """The first box in `text` in `box_format` (a `data/boxes/` module), or None when there
  is none or the box text is malformed."""
  try:
    found = box_format.find_boxes(text)
  except BoxFormatError:
    return None
  return found[0] if found else None


def iou_accuracy(texts: list[str], truths: list, box_format,
                 threshold: float = 0.5) -> float:
  """Fraction of texts whose first box has IoU >= threshold with its truth box."""
  if len(texts) != len(truths) or not texts:
    raise ValueError(f"{len(texts)} texts for {len(truths)} truth boxes.")
  hits = 0
  for text, truth in zip(texts, truths):
    box = first_box(text, box_format)
    hits += box is not None and iou(box, truth) >= threshold
  return hits / len(texts)
