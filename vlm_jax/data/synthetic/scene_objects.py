"""Objects with boxes recovered from a synthetic scene and its caption.

A scene caption is parsed back into its groups (count, colour, shape, position) with the
grammar of `scenes.py`, and each group's box is the bounding box of the non-background
pixels inside its region (the regions of two groups never overlap); a rendered-words image
yields one object, the words, boxed the same way. Boxes are `boxes.percent` ints (0..100).
"""
import dataclasses
import re

import numpy as np

from vlm_jax.data import preprocessors
from vlm_jax.data.boxes import percent
from vlm_jax.data.synthetic import scenes


# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SceneObject:
  phrase: str  # "two red circles" / the rendered words
  box: tuple[int, int, int, int]  # 0..100 ints
  count: int = 0  # 0 for rendered words
  colour: str = ""
  shape: str = ""
  position: str = ""


_GROUP = re.compile(
    r"(?P<count>a|two|three) (?P<colour>{}) (?P<shape>{})s? (?P<position>{})".format(
        "|".join(scenes.COLOURS), "|".join(scenes.SHAPES),
        "|".join(re.escape(p) for p in scenes.PHRASES.values())))
_COUNTS = {w: n for n, w in scenes.COUNT_WORDS.items()}
_POSITIONS = {p: k for k, p in scenes.PHRASES.items()}


def parse_scene_caption(caption: str):
  """`scenes.describe` output -> [(count, colour, shape, position)], or None if the
  caption is not a scene description (e.g. rendered words)."""
  groups = []
  for part in caption.split(" and "):
    match = _GROUP.fullmatch(part.strip())
    if not match:
      return None
    groups.append((_COUNTS[match["count"]], match["colour"], match["shape"],
                   _POSITIONS[match["position"]]))
  return groups


def _foreground(pixels: np.ndarray, threshold: int = 60) -> np.ndarray:
  background = np.median(pixels.reshape(-1, 3), axis=0)
  return np.abs(pixels.astype(np.int32) - background).max(axis=-1) > threshold


def _bbox(mask, x0=0, y0=0):
  ys, xs = np.nonzero(mask)
  if not len(xs):
    return None
  return (x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1)


def scene_objects(pixels: np.ndarray, caption: str) -> list[SceneObject]:
  """Objects of a synthetic image (uint8 [H, W, 3]) and its caption; raises BadRecord when
  no object can be located."""
  height, width = pixels.shape[:2]
  fg = _foreground(pixels)
  groups = parse_scene_caption(caption)
  if groups is None:  # rendered words: the caption is the text
    box = _bbox(fg)
    if box is None:
      raise preprocessors.BadRecord("no text pixels found")
    return [SceneObject(caption, percent.normalise_box(box, width, height))]
  objects = []
  for count, colour, shape, position in groups:
    rx0, ry0, rx1, ry1 = scenes.REGIONS[position]
    x0, y0 = int(rx0 * width), int(ry0 * height)
    x1, y1 = int(np.ceil(rx1 * width)), int(np.ceil(ry1 * height))
    box = _bbox(fg[y0:y1, x0:x1], x0, y0)
    if box is None:
      raise preprocessors.BadRecord(f"no pixels of {colour} {shape} {position}")
    phrase = f"{scenes.COUNT_WORDS[count]} {colour} {shape}{'s' if count > 1 else ''}"
    objects.append(SceneObject(phrase, percent.normalise_box(box, width, height), count,
                               colour, shape, position))
  if len({o.phrase for o in objects}) < len(objects):  # identical groups: say where
    objects = [dataclasses.replace(o, phrase=f"{o.phrase} {scenes.PHRASES[o.position]}")
               for o in objects]
  return objects
