"""How an architecture module states its mapping: rules between our leaves and HF tensors.

A `Rule` ties a few of our parameter arrays (paths relative to the imported sub-tree) to a few
HF tensors, with the conversion both ways; the same rules drive import and export, so there is
one mapping per architecture. Layer rules are written for one layer (`{i}` in HF names, paths
relative to the layer) and expanded over a layer stack, whichever layout the stack has:

    scanned            <root>/layers/<path>                      [L, ...], layer i at [i]
    unscanned          <root>/layers_{i}/<path>
    grouped (g/unit)   <root>/layers/sublayer_{i % g}/<path>     [L/g, ...], at [i // g]
    grouped unscanned  <root>/layers_{i // g}/sublayer_{i % g}/<path>

Conversions are written with jax.numpy so that `jax.eval_shape` gives the HF shapes a model
expects (shape checks before any tensor is read); they run eagerly on the host CPU device.
"""
import dataclasses
import math
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.convert.checkpoint import ConversionError


@dataclasses.dataclass(frozen=True)
class Rule:
  """`to_ours(*hf, shapes=...)` -> our arrays (in `targets` order, shaped `shapes`);
  `to_hf(*ours)` -> HF tensors (in `sources` order)."""
  targets: tuple[str, ...]
  sources: tuple[str, ...]
  to_ours: Callable
  to_hf: Callable


@dataclasses.dataclass(frozen=True)
class Slot:
  """Where one concrete rule lands: our leaf paths, an index into their leading (layers)
  axis or None, and the HF tensor names."""
  rule: Rule
  targets: tuple[str, ...]
  index: int | None
  sources: tuple[str, ...]


# ---------------------------------------------------------------------------------------
# Conversions. HF Linear weights are [out, in]; our kernels are [in..., out...].
# ---------------------------------------------------------------------------------------
def copy(target: str, source: str) -> Rule:
  return Rule((target,), (source,), lambda w, shapes: (w.reshape(shapes[0]),),
              lambda x: (x,))


def vector(target: str, source: str) -> Rule:
  """A bias [N*H] <-> [N, H] (or any shape <-> flat)."""
  return Rule((target,), (source,), lambda w, shapes: (w.reshape(shapes[0]),),
              lambda x: (x.reshape(-1),))


def dense(target: str, source: str, in_axes: int = 1) -> Rule:
  """nn.Linear weight [out, in] <-> our kernel [*in (in_axes axes), *out]."""
  def to_hf(kernel):
    return (kernel.reshape(math.prod(kernel.shape[:in_axes]), -1).T,)
  return Rule((target,), (source,), lambda w, shapes: (w.T.reshape(shapes[0]),), to_hf)


def layer_norm(ours: str, hf: str) -> list[Rule]:
  """nn.LayerNorm `hf`.{weight,bias} <-> our `ours`/{scale,bias}."""
  return [copy(f"{ours}/scale", f"{hf}.weight"), copy(f"{ours}/bias", f"{hf}.bias")]


def linear(ours: str, hf: str, in_axes: int = 1) -> list[Rule]:
  """nn.Linear `hf`.{weight,bias} <-> our `ours`/{kernel,bias}."""
  return [dense(f"{ours}/kernel", f"{hf}.weight", in_axes), vector(f"{ours}/bias", f"{hf}.bias")]


def constant(fills: dict[str, Callable]) -> Rule:
  """Our params that no file holds because the reference fixes them (e.g. a LayerNorm left
  at its initialisation): path -> fill(shape) on import; on export they must still hold
  that value (the format has no place for another) and nothing is written."""
  def to_hf(*ours):
    for (path, fill), value in zip(fills.items(), ours):
      if not isinstance(value, jax.core.Tracer) and not np.array_equal(value, fill(value.shape)):
        raise ConversionError(f"{path} differs from the value the format fixes; the export has "
                              "no place for it.")
    return ()
  return Rule(tuple(fills), (), lambda shapes: tuple(f(s) for f, s in zip(fills.values(), shapes)),
              to_hf)


def fused(targets: tuple[str, ...], source: str) -> Rule:
  """One nn.Linear weight whose output rows are the parts one after the other (MPT's Wqkv,
  torch MultiheadAttention's in_proj_weight: [q; k; v], each (heads, head_dim)) <-> one of
  our kernels [D, *out] per part."""
  def to_ours(w, shapes):
    return tuple(p.T.reshape(s) for p, s in zip(jnp.split(w, len(targets)), shapes))

  def to_hf(*kernels):
    return (jnp.concatenate([k.reshape(k.shape[0], -1).T for k in kernels]),)
  return Rule(tuple(targets), (source,), to_ours, to_hf)


def fused_vector(targets: tuple[str, ...], source: str) -> Rule:
  """The bias of a `fused` projection [parts * N*H] <-> one [N, H] (or any shape) per part."""
  def to_ours(b, shapes):
    return tuple(p.reshape(s) for p, s in zip(jnp.split(b, len(targets)), shapes))
  return Rule(tuple(targets), (source,), to_ours,
              lambda *parts: (jnp.concatenate([p.reshape(-1) for p in parts]),))


def conv(target: str, source: str) -> Rule:
  """nn.Conv2d weight [out, in, kh, kw] <-> flax Conv kernel [kh, kw, in, out]."""
  return Rule((target,), (source,), lambda w, shapes: (jnp.transpose(w, (2, 3, 1, 0)),),
              lambda k: (jnp.transpose(k, (3, 2, 0, 1)),))


def prefixed(rules: list[Rule], prefix: str) -> list[Rule]:
  """The same rules with `prefix` before every HF name (e.g. 'model.')."""
  return [dataclasses.replace(r, sources=tuple(prefix + s for s in r.sources)) for r in rules]


def under(slots: list["Slot"], path_prefix: str, name_prefix: str) -> list["Slot"]:
  """Slots made for a sub-tree and one checkpoint of several, re-rooted: our paths under
  `path_prefix` (e.g. 'vision/'), tensor names under `name_prefix` (e.g. 'vision:')."""
  return [dataclasses.replace(s, targets=tuple(path_prefix + t for t in s.targets),
                              sources=tuple(name_prefix + n for n in s.sources))
          for s in slots]


def subtree(items, prefix: str):
  """The entries of a dict (our paths -> shapes) or a set (tensor names) under `prefix`, the
  prefix removed; None (export: no checkpoint names) stays None."""
  if items is None:
    return None
  if isinstance(items, dict):
    return {k[len(prefix):]: v for k, v in items.items() if k.startswith(prefix)}
  return {k[len(prefix):] for k in items if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------
# Layer stacks.
# ---------------------------------------------------------------------------------------
def stack_slots(paths: dict[str, tuple[int, ...]], root: str) -> list[tuple[str, int | None]]:
  """For each model layer i: (path prefix of its params, index in their leading axis)."""
  under = [p[len(root) + 1:] for p in paths if p.startswith(root + "/")]
  heads = {p.split("/")[0] for p in under}
  if heads == {"layers"}:
    first = next(p for p in under)
    groups = sorted({int(m.group(1)) for p in under
                     if (m := re.match(r"layers/sublayer_(\d+)/", p))})
    length = paths[f"{root}/{first}"][0]
    if not groups:
      return [(f"{root}/layers", i) for i in range(length)]
    g = len(groups)
    return [(f"{root}/layers/sublayer_{i % g}", i // g) for i in range(length * g)]
  units = sorted(int(h.split("_")[1]) for h in heads if re.fullmatch(r"layers_\d+", h))
  if not units or len(units) != len(heads):
    raise ValueError(f"{root!r} is not a layer stack (its children are {sorted(heads)}).")
  groups = sorted({int(m.group(1)) for p in under
                   if (m := re.match(r"layers_\d+/sublayer_(\d+)/", p))})
  if not groups:
    return [(f"{root}/layers_{i}", None) for i in units]
  g = len(groups)
  return [(f"{root}/layers_{i // g}/sublayer_{i % g}", None) for i in range(len(units) * g)]


def expand(paths: dict[str, tuple[int, ...]], plain: list[Rule],
           stacks: list[tuple[str, list[Rule]]]) -> list[Slot]:
  """Concrete slots: `plain` rules once, each (root, per-layer rules) over root's layers.
  `paths` maps our leaf paths to shapes (to find the stacks' layouts)."""
  slots = [Slot(r, r.targets, None, r.sources) for r in plain]
  for root, rules in stacks:
    for i, (prefix, index) in enumerate(stack_slots(paths, root)):
      for r in rules:
        slots.append(Slot(r, tuple(f"{prefix}/{t}" for t in r.targets), index,
                          tuple(s.format(i=i) for s in r.sources)))
  return slots


def num_layers(paths: dict[str, tuple[int, ...]], root: str) -> int:
  return len(stack_slots(paths, root))
