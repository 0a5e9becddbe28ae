"""Grounding accuracy: the first box parsed from generated text has IoU >= 0.5 with the truth.

Both box formats of the project: MiniGPT-v2 `{<x1><y1><x2><y2>}` (0..100) and CogAgent
`[[x0,y0,x1,y1]]` (000..999). IoU is computed in the format's own integer coordinates
(both boxes are in the same normalised space); text without a well-formed box scores 0.
"""
import re

from vlm_jax.data import boxes as minigpt_boxes
from vlm_jax.data import cogagent_boxes

_MINIGPT_BOX = re.compile(r"\{<\d+><\d+><\d+><\d+>\}")


def iou(a, b) -> float:
  """Intersection over union of two (x0, y0, x1, y1) boxes (0 if both are empty)."""
  ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = ix * iy
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


def first_box(text: str, box_format: str):
  """The first well-formed box in `text` for 'minigpt_v2' or 'cogagent', else None."""
  try:
    if box_format == "minigpt_v2":
      match = _MINIGPT_BOX.search(text)
      return minigpt_boxes.parse_box(match.group(0)) if match else None
    if box_format == "cogagent":
      found = cogagent_boxes.find_boxes(text)
      return found[0][0] if found else None
  except minigpt_boxes.BoxFormatError:
    return None
  raise ValueError(f"box_format={box_format!r}: expected 'minigpt_v2' or 'cogagent'.")


def iou_accuracy(texts: list[str], truths: list, box_format: str,
                 threshold: float = 0.5) -> float:
  """Fraction of texts whose first box has IoU >= threshold with its truth box."""
  if len(texts) != len(truths) or not texts:
    raise ValueError(f"{len(texts)} texts for {len(truths)} truth boxes.")
  hits = 0
  for text, truth in zip(texts, truths):
    box = first_box(text, box_format)
    hits += box is not None and iou(box, truth) >= threshold
  return hits / len(texts)
