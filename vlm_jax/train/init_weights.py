"""`config.init.lm` / `config.init.vision`: pretrained HF weights into a fresh train state.

The model class declares where each lands, e.g. MiniGPT-v2's
`PRETRAINED_PARTS = {"lm": {"path": "lm"}, "vision": {"path": "vision"}}`, with optional
`"new": (regexes,)` for params inside that sub-tree that no checkpoint has (Flamingo's gated
cross-attention inside the LM's layer groups) and `"exclude": (regexes,)` for params of the
sub-tree that belong to another part (a path of "" is the whole tree, e.g. Prismer, whose
RoBERTa params sit at the top level beside `vision/`); regexes are relative to the path and
fullmatch. `"arch"` names the HF architecture `vlm-convert export` writes the part as when
the module alone does not say (Prismer: "roberta"). Nothing here knows a family. Arrays land one at
a time in the state's shardings (trainable or frozen side, whichever the param is on), each
replacing its random initialisation, which is freed at once; the optimizer state is rebuilt.
"""
import re

import jax

from vlm_jax import convert
from vlm_jax.convert.transfer import flatten, unflatten

KEYS = ("lm", "vision")


def requested(config) -> dict[str, str]:
  init = config.get("init") or {}
  return {key: init.get(key, "") for key in KEYS if init.get(key, "")}


def pretrained_parts(model) -> dict:
  return dict(getattr(type(model), "PRETRAINED_PARTS", {}))


def part_target(part: dict, target: dict) -> tuple[str, dict, tuple[str, ...]]:
  """(path prefix, the part's entries of `target` keyed relative to it, new regexes)."""
  root = part["path"].strip("/")
  root = root + "/" if root else ""
  exclude = [re.compile(p) for p in part.get("exclude", ())]
  sub = {p[len(root):]: s for p, s in target.items() if p.startswith(root)}
  sub = {p: s for p, s in sub.items() if not any(r.fullmatch(p) for r in exclude)}
  return root, sub, tuple(part.get("new", ()))


def apply(config, model, factory, state, log=print):
  """`state` with the parts named in config.init replaced by the checkpoints' weights."""
  paths = requested(config)
  if not paths:
    return state
  parts = pretrained_parts(model)
  for key, path in paths.items():
    if key not in parts:
      raise convert.ConversionError(
          f"config.init.{key}={path!r}: {type(model).__name__} declares no {key!r} part "
          f"(its PRETRAINED_PARTS: {sorted(parts) or 'none'}).")
  abstract = factory.abstract_with_shardings()
  target = {**flatten(abstract.params), **flatten(abstract.frozen)}
  trainable, frozen = flatten(state.params), flatten(state.frozen)
  for key, path in paths.items():
    root, sub, new = part_target(parts[key], target)
    plan = convert.plan(path, sub, new=new)
    with plan.checkpoint:
      for name, array in convert.transfer.load(plan):
        side = trainable if root + name in trainable else frozen
        old, side[root + name] = side[root + name], array
        old.delete()
    log(f"config.init.{key}: imported into {root or 'the model'}: "
        f"{convert.transfer.describe(plan)}")
  params, frozen_tree = unflatten(trainable), unflatten(frozen)
  opt_state = jax.jit(factory.tx.init, out_shardings=factory.shardings.opt_state)(params)
  return state.replace(params=params, frozen=frozen_tree, opt_state=opt_state)
