"""Expert labels as data (Prismer): expert functions, label storage, readers, label tables.

Kinds of expert output, kept per example beside the image:

    dense     depth (1 channel), normal (3), edge (1): uint8 maps, as the reference stores
              its experts' PNGs; Prismer's processor rescales each map to [-1, 1] (min-max per
              image, as the reference's `post_label_process`)
    label     seg, obj_detection, ocr_detection: an id per pixel (uint8, 255 = background)
              and the name of each id (a class for seg, an instance's class for
              obj_detection, an instance's text for ocr_detection); Prismer's processor turns
              names into vectors with a `LabelTable` (the reference: PCA-reduced CLIP text
              embeddings of the names, 64-d) and keeps obj_detection's ids as instances

Expert functions `fn(image uint8 [H, W, 3], truth: SceneTruth | None) -> label` are
pluggable (`EXPERTS`). Without downloaded weights we have classical edges (Sobel magnitude)
and, for synthetic scenes, what the generator knows (`SceneTruth`): the exact depth order
(later shapes are in front), the segmentation, instance boxes and text boxes; normals are
derived from that depth. Labels computed elsewhere (a real depth or segmentation network)
are read from a directory in the reference's layout (`read_precomputed`).
"""
import dataclasses
import hashlib
import io
import json

import numpy as np
from PIL import Image, ImageDraw

from vlm_jax import storage


DENSE_CHANNELS = {"depth": 1, "normal": 3, "edge": 1}
LABEL_EXPERTS = ("seg", "obj_detection", "ocr_detection")
ALL_EXPERTS = tuple(DENSE_CHANNELS) + LABEL_EXPERTS
BACKGROUND = 255  # id of unlabelled pixels in label maps (the reference's convention)
MAX_IDS = 255


class ExpertUnavailable(ValueError):
  """An expert that cannot run on this input (e.g. needs scene truth or precomputed labels)."""


@dataclasses.dataclass
class LabelMap:
  ids: np.ndarray  # uint8 [H, W]; BACKGROUND where unlabelled
  names: list  # names[i] names id i

  def __post_init__(self):
    used = np.unique(self.ids)
    used = used[used != BACKGROUND]
    if len(self.names) > MAX_IDS or (len(used) and used.max() >= len(self.names)):
      raise ValueError(f"label map uses ids up to {used.max() if len(used) else -1} but names "
                       f"{len(self.names)} (at most {MAX_IDS}).")


@dataclasses.dataclass
class SceneTruth:
  """What the synthetic generator knows about one image."""
  instances: np.ndarray  # uint8 [H, W]: instance id per pixel in drawing order, 255 = none
  classes: list  # class name per instance ("circle", ..., "text")
  words: list  # [(word, (x0, y0, x1, y1))] rendered words and their boxes in pixels


def check_experts(experts) -> tuple:
  experts = tuple(experts)
  unknown = [e for e in experts if e not in ALL_EXPERTS]
  if unknown or len(set(experts)) != len(experts):
    raise ValueError(f"experts {experts}: expected distinct names from {ALL_EXPERTS}.")
  return experts


# ----------------------------------------------------------------------------------------
# Expert functions
# ----------------------------------------------------------------------------------------
def _to_uint8(x: np.ndarray) -> np.ndarray:
  lo, hi = float(x.min()), float(x.max())
  if hi - lo < 1e-12:
    return np.zeros(x.shape, np.uint8)
  return np.round((x - lo) / (hi - lo) * 255).astype(np.uint8)


def edge_expert(image: np.ndarray, truth=None) -> np.ndarray:
  """Sobel gradient magnitude of the grey image (a classical stand-in for HED)."""
  del truth
  grey = np.asarray(image, np.float32) @ np.asarray([0.299, 0.587, 0.114], np.float32)
  padded = np.pad(grey, 1, mode="edge")
  window = lambda dy, dx: padded[1 + dy:1 + dy + grey.shape[0], 1 + dx:1 + dx + grey.shape[1]]
  gx = (window(-1, 1) + 2 * window(0, 1) + window(1, 1)
        - window(-1, -1) - 2 * window(0, -1) - window(1, -1))
  gy = (window(1, -1) + 2 * window(1, 0) + window(1, 1)
        - window(-1, -1) - 2 * window(-1, 0) - window(-1, 1))
  return _to_uint8(np.hypot(gx, gy))


def _need_truth(truth, name):
  if truth is None:
    raise ExpertUnavailable(f"expert {name!r} has no model here: it needs scene truth "
                            "(synthetic scenes) or precomputed labels (--labels DIR).")


def scene_depth(truth: SceneTruth) -> np.ndarray:
  """Inverse depth (bigger = nearer, like MiDaS): background 0, instance k of n drawn k-th
  (later shapes cover earlier ones) at (k + 1) / n."""
  n = max(len(truth.classes), 1)
  levels = np.zeros(256, np.float32)
  levels[:len(truth.classes)] = (np.arange(len(truth.classes)) + 1) / n
  return levels[truth.instances]


def depth_expert(image, truth=None) -> np.ndarray:
  _need_truth(truth, "depth")
  return np.round(scene_depth(truth) * 255).astype(np.uint8)


def normal_expert(image, truth=None) -> np.ndarray:
  """Surface normals from the scene's depth: n ~ (-dz/dx, -dz/dy, 1), as RGB uint8."""
  _need_truth(truth, "normal")
  depth = scene_depth(truth) * 8.0  # depth steps in pixels, so edges tilt visibly
  dzdy, dzdx = np.gradient(depth)
  normal = np.stack([-dzdx, -dzdy, np.ones_like(depth)], axis=-1)
  normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
  return np.round((normal + 1) * 127.5).astype(np.uint8)


def seg_expert(image, truth=None) -> LabelMap:
  """Semantic segmentation: the class of each pixel's visible instance."""
  _need_truth(truth, "seg")
  names = sorted(set(truth.classes))
  lookup = np.full(256, BACKGROUND, np.uint8)
  for i, cls in enumerate(truth.classes):
    lookup[i] = names.index(cls)
  return LabelMap(lookup[truth.instances], names)


def _filled_boxes(shape, boxes) -> np.ndarray:
  canvas = Image.new("L", (shape[1], shape[0]), BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  for i, (x0, y0, x1, y1) in enumerate(boxes):
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=i)
  return np.asarray(canvas, np.uint8)


def obj_detection_expert(image, truth=None) -> LabelMap:
  """Each detected instance's box, filled with its id (later ones on top); names = classes."""
  _need_truth(truth, "obj_detection")
  boxes, names = [], []
  for i, cls in enumerate(truth.classes):
    ys, xs = np.nonzero(truth.instances == i)
    if cls != "text" and len(xs):
      boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
      names.append(cls)
  return LabelMap(_filled_boxes(truth.instances.shape, boxes), names)


def ocr_detection_expert(image, truth=None) -> LabelMap:
  """Each word's box filled with its id; names = the words (what OCR would read)."""
  _need_truth(truth, "ocr_detection")
  return LabelMap(_filled_boxes(truth.instances.shape, [b for _, b in truth.words]),
                  [w for w, _ in truth.words])


IMAGE_ONLY_EXPERTS = ("edge",)  # run on any image; the others need truth or labels
EXPERTS = {"depth": depth_expert, "normal": normal_expert, "edge": edge_expert,
           "seg": seg_expert, "obj_detection": obj_detection_expert,
           "ocr_detection": ocr_detection_expert}


def label_image(image: np.ndarray, experts, truth=None, precomputed=None) -> dict:
  """{expert: label} for one uint8 image: precomputed labels (a dict from
  `read_precomputed`, resized to the image with nearest neighbours) win, else the expert
  function runs."""
  out = {}
  for name in check_experts(experts):
    if precomputed is not None and name in precomputed:
      out[name] = _resize_label(precomputed[name], image.shape[:2])
    else:
      out[name] = EXPERTS[name](image, truth)
    check_label(name, out[name], image.shape[:2])
  return out


def _resize_label(label, hw):
  resize = lambda a: (a if a.shape[:2] == tuple(hw) else
                      np.asarray(Image.fromarray(a).resize(hw[::-1], Image.NEAREST)))
  if isinstance(label, LabelMap):
    return LabelMap(resize(label.ids), label.names)
  return resize(label)


def check_label(name, label, hw):
  if name in LABEL_EXPERTS:
    if not isinstance(label, LabelMap):
      raise TypeError(f"expert {name!r} must give a LabelMap, got {type(label).__name__}")
    shape, want = label.ids.shape, tuple(hw)
  else:
    channels = DENSE_CHANNELS[name]
    shape = label.shape if channels > 1 else label.shape + (1,)
    want = tuple(hw) + (channels,)
  if tuple(shape) != want:
    raise ValueError(f"expert {name!r} label has shape {tuple(shape)}, expected {want}.")


# ----------------------------------------------------------------------------------------
# Storage: one PNG per expert beside the image, names in the record header
# ----------------------------------------------------------------------------------------
def _png(array: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(array).save(out, format="PNG")
  return out.getvalue()


def encode_labels(labels: dict) -> tuple[list, list]:
  """{expert: label} -> (header entries [{'name', 'names'?}], PNG blobs), same order."""
  header, blobs = [], []
  for name, label in labels.items():
    if isinstance(label, LabelMap):
      header.append({"name": name, "names": list(label.names)})
      blobs.append(_png(label.ids))
    else:
      header.append({"name": name})
      blobs.append(_png(label))
  return header, blobs


def decode_labels(header: list, blobs: list) -> dict:
  if len(header) != len(blobs):
    raise ValueError(f"record lists {len(header)} experts but holds {len(blobs)} label blobs")
  out = {}
  for entry, blob in zip(header, blobs):
    array = np.asarray(Image.open(io.BytesIO(blob)), np.uint8)
    out[entry["name"]] = LabelMap(array, entry["names"]) if "names" in entry else array
  return out


def read_precomputed(label_dir: str, key: str, experts) -> dict:
  """Labels computed elsewhere, in the reference's layout: `<label_dir>/<expert>/<key>.png`
  (depth/edge grey, normal RGB, label maps grey ids with 255 = background) and, for label
  maps, `<key>.json` naming the ids (a list, or {"id": name}). Missing experts are left
  out (the caller may compute them)."""
  out = {}
  for name in check_experts(experts):
    png = storage.join(label_dir, name, f"{key}.png")
    if not storage.exists(png):
      continue
    image = Image.open(io.BytesIO(storage.read_bytes(png)))
    if name in LABEL_EXPERTS:
      meta = storage.join(label_dir, name, f"{key}.json")
      if not storage.exists(meta):
        raise FileNotFoundError(f"{png} needs {meta} naming its ids")
      names = json.loads(storage.read_text(meta))
      if isinstance(names, dict):
        listed = [None] * (max(int(k) for k in names) + 1) if names else []
        for k, v in names.items():
          listed[int(k)] = v
        names = listed
      out[name] = LabelMap(np.asarray(image.convert("L"), np.uint8), names)
    else:
      mode = "RGB" if DENSE_CHANNELS[name] == 3 else "L"
      out[name] = np.asarray(image.convert(mode), np.uint8)
  return out


# ----------------------------------------------------------------------------------------
# Label tables: name -> vector
# ----------------------------------------------------------------------------------------
def default_vector(name: str, dim: int) -> np.ndarray:
  """A fixed unit vector per name (seeded by its SHA-256): a table for any vocabulary when no
  text-embedding table is given."""
  seed = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")
  v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
  return v / np.linalg.norm(v)


class LabelTable:
  """Per-class vectors from a file (.npz with `names` and `vectors` [n, dim], or .json
  {name: [floats]}), e.g. PCA-reduced text embeddings of class names; "" = `default_vector`.
  'background' names the vector of unlabelled pixels (default: its default vector)."""

  def __init__(self, path: str = "", dim: int = 64):
    self.path, self.dim, self._table = path, dim, {}
    if path:
      self._table = self._load(path)
      bad = {k: v.shape for k, v in self._table.items() if v.shape != (dim,)}
      if bad:
        raise ValueError(f"label table {path}: vectors must have {dim} entries "
                         f"(config data.label_dim); got {dict(list(bad.items())[:3])}")

  @staticmethod
  def _load(path):
    if not storage.exists(path):
      raise FileNotFoundError(f"label table {path!r} (config data.label_table) not found")
    if path.endswith(".npz"):
      with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as data:
        if "names" not in data or "vectors" not in data:
          raise ValueError(f"label table {path}: expected arrays 'names' and 'vectors'")
        return {str(n): np.asarray(v, np.float32) for n, v in zip(data["names"],
                                                                   data["vectors"])}
    if path.endswith(".json"):
      return {k: np.asarray(v, np.float32)
              for k, v in json.loads(storage.read_text(path)).items()}
    raise ValueError(f"label table {path}: expected a .npz or .json file")

  def vector(self, name: str) -> np.ndarray:
    if name not in self._table:
      if self.path and name != "background":
        raise KeyError(f"label table {self.path} has no vector for {name!r}")
      self._table[name] = default_vector(name, self.dim)
    return self._table[name]

  def embed(self, label: LabelMap) -> np.ndarray:
    """[H, W] ids -> [H, W, dim] vectors (background pixels get 'background')."""
    vectors = np.stack([self.vector(n) for n in label.names] + [self.vector("background")])
    index = np.where(label.ids == BACKGROUND, len(label.names), label.ids)
    return vectors[index]
