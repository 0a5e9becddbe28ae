"""Per-record labelling hooks for ingest (`--experts SPEC`), e.g. Prismer's expert models.

A labeller is a function `record -> record` that adds fields to a validated record (its
images are raw bytes) which `records.encode` can store. `make(spec)` builds it from a
string, so a Beam worker can build its own copy once (`DoFn.setup`) and load any model
there:

    NAME[=ARG]   NAME: a key of LABELLERS, or `package.module:factory`; the factory is
                 called as factory(ARG) (or factory() without `=ARG`) and returns the
                 per-record function.

`mean_colour` is a trivial expert (per-image mean RGB in the record header) that exercises
the hook end to end without model weights.
"""
import importlib
import io

import numpy as np
from PIL import Image


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


LABELLERS = {"mean_colour": mean_colour}


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
