"""Per-record labelling hooks for ingest (`--experts SPEC`), e.g. Prismer's expert models.

A labeller is a function `record -> record` that adds fields to a validated record (its
images are raw bytes) which `records.encode` can store. `make(spec)` builds it from a
string, so a Beam worker can build its own copy once (`DoFn.setup`) and load any model
there:

    NAME[=ARG]   NAME: a key of LABELLERS, or `package.module:factory`; the factory is
                 called as factory(ARG) (or factory() without `=ARG`) and returns the
                 per-record function.

`experts=EXPERTS[;labels=DIR]` is the expert labelling Prismer reads (`experts.py`): each pair's
image gets one label per expert, stored as Prismer's processor reads them (`images` = the
label PNGs, `experts` = their header). `mean_colour` is a trivial expert (per-image mean RGB
in the record header) that exercises the hook end to end without model weights.

A labeller may raise `preprocessors.BadRecord` for a record it cannot label (e.g. its
precomputed label is missing): the record is counted as bad and skipped.
"""
import importlib
import io
import os

import numpy as np
from PIL import Image

from vlm_jax import storage

from vlm_jax.data import preprocessors
from vlm_jax.data.ingest import experts


def _images(record):
  if record["kind"] == "pairs":
    return [record["image"]]
  return [i for i in record.get("images", ()) if i is not None]


def mean_colour(arg=None):
  """Labels each image with its mean R, G, B in [0, 255] (one list per image, in order);
  `arg`: decimals kept (default 2)."""
  decimals = int(arg) if arg else 2

  def label(record):
    labels = dict(record.get("labels") or {})
    labels["mean_colour"] = [
        [round(float(v), decimals) for v in np.asarray(
            Image.open(io.BytesIO(image)).convert("RGB"), np.float64).mean(axis=(0, 1))]
        for image in _images(record)]
    record["labels"] = labels
    return record

  return label


def experts_spec(expert_names, label_dir="") -> str:
  """The `--experts` spec of Prismer's labeller; checks the names and that every expert that
  cannot run on images alone has precomputed labels."""
  expert_names = experts.check_experts(expert_names)
  need_labels = [e for e in expert_names if e not in experts.IMAGE_ONLY_EXPERTS]
  if need_labels and not label_dir:
    raise experts.ExpertUnavailable(
        f"experts {need_labels} have no model here; give their precomputed labels with "
        f"--labels DIR (only {experts.IMAGE_ONLY_EXPERTS} run on images alone).")
  if label_dir and not storage.isdir(label_dir):
    raise FileNotFoundError(f"--labels {label_dir!r}: no such directory")
  return "experts=" + ",".join(expert_names) + (f";labels={label_dir}" if label_dir else "")


def expert_maps(arg=""):
  """Prismer's experts on image-text pairs; `arg`: `EXPERTS[;labels=DIR]` (comma-separated
  expert names; DIR: labels computed elsewhere, `DIR/<expert>/<key>.png`)."""
  names, _, rest = (arg or "").partition(";")
  label_dir = rest.removeprefix("labels=")
  if rest and label_dir == rest:
    raise ValueError(f"--experts experts={arg!r}: expected EXPERTS[;labels=DIR]")
  names = [n for n in names.split(",") if n]
  if not names:
    raise ValueError(f"--experts experts={arg!r}: name at least one expert")
  experts_spec(names, label_dir)  # the same checks as the CLI's

  def label(record):
    if record["kind"] != "pairs":  # every record would be bad: a wrong input, not data
      raise ValueError(f"--experts experts labels image-text pairs, not {record['kind']} "
                       "records")
    image = np.asarray(Image.open(io.BytesIO(record["image"])).convert("RGB"), np.uint8)
    precomputed = None
    if label_dir:
      precomputed = experts.read_precomputed(label_dir, os.path.basename(record["key"]), names)
      missing = [n for n in names if n not in precomputed and n not in experts.IMAGE_ONLY_EXPERTS]
      if missing:
        raise preprocessors.BadRecord(f"missing precomputed label: {', '.join(missing)}")
    header, blobs = experts.encode_labels(experts.label_image(image, names,
                                                              precomputed=precomputed))
    record["images"], record["experts"] = blobs, header
    return record

  return label


LABELLERS = {"mean_colour": mean_colour, "experts": expert_maps}


def _identity(record):
  return record


def make(spec: str):
  """The per-record function named by `spec` (see the module docstring); "" = identity."""
  if not spec:
    return _identity
  name, has_arg, arg = spec.partition("=")
  if name in LABELLERS:
    factory = LABELLERS[name]
  elif ":" in name:
    module, _, attr = name.partition(":")
    try:
      factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
      raise ValueError(f"--experts {spec!r}: cannot load {name}: {e}") from None
  else:
    raise ValueError(f"--experts {spec!r}: expected one of {sorted(LABELLERS)} or "
                     "package.module:factory, optionally =ARG")
  return factory(arg) if has_arg else factory()
