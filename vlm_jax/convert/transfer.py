"""Import (HF tensors -> our sharded arrays) and export (our arrays -> HF shards) by rules.

Import checks everything before reading any tensor data: every HF tensor a rule needs exists
with the shape our parameter implies, every tensor in the checkpoint is used (or ignored by
the architecture on purpose), and every one of our parameters is produced (or is a new part
that keeps its initialisation). Then it builds one of our parameter arrays at a time on the
host (a stacked [L, ...] array from L layer tensors), converts its dtype and places it in the
target sharding with `jax.make_array_from_callback`, which hands each device (each process,
in a multi-host job) only its shard; host memory holds one parameter at a time.
"""
import collections
import dataclasses
import re
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from vlm_jax.convert import checkpoint as ckpt_lib
from vlm_jax.convert import rules as rules_lib
from vlm_jax.convert.checkpoint import ConversionError

MAX_LISTED = 8


def flatten(tree: Mapping) -> dict[str, Any]:
  return traverse_util.flatten_dict(dict(tree), sep="/")


def unflatten(flat: Mapping) -> dict:
  return traverse_util.unflatten_dict(dict(flat), sep="/")


def _listed(items, what: str) -> str:
  items = list(items)
  more = f"\n  ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
  return f"{what}:\n  " + "\n  ".join(items[:MAX_LISTED]) + more


@dataclasses.dataclass
class ImportPlan:
  """What `load` will do; built and checked by `plan_import`."""
  checkpoint: ckpt_lib.Checkpoint
  target: dict[str, jax.ShapeDtypeStruct]
  by_leaf: dict[str, list[tuple[rules_lib.Slot, int]]]  # our path -> (slot, position)
  kept: list[str]  # our new parameters: they keep their initialisation
  dtype_changes: dict[tuple[str, str], int]  # (checkpoint dtype, ours) -> tensor count


def _layer_shape(struct, index):
  return tuple(struct.shape) if index is None else tuple(struct.shape[1:])


def plan_import(checkpoint: ckpt_lib.Checkpoint, arch, target: Mapping[str, Any],
                new: tuple[str, ...] = ()) -> ImportPlan:
  """Checks `checkpoint` against `target` ('/'-path -> ShapeDtypeStruct, relative to the
  imported sub-tree); `new` are fullmatch regexes of our params the checkpoint cannot have."""
  shapes = {p: tuple(s.shape) for p, s in target.items()}
  slots = arch.slots(shapes, set(checkpoint.tensors))
  by_leaf = collections.defaultdict(list)
  problems, needed = [], {}
  for slot in slots:
    for pos, path in enumerate(slot.targets):
      if path not in target:
        raise ConversionError(f"the {arch.NAME} mapping produces {path!r}, which the model does "
                              "not have (a bug in the mapping).")
      by_leaf[path].append((slot, pos))
    for name in slot.sources:
      needed[name] = slot
  source = checkpoint.source

  missing = [f"{name} (for our {slot.targets[0]})" for name, slot in needed.items()
             if name not in checkpoint.tensors]
  if missing:
    problems.append(_listed(missing, f"tensors missing from {source}"))
  ignore = [re.compile(p) for p in arch.IGNORE]
  unexpected = [n for n in checkpoint.tensors
                if n not in needed and not any(p.fullmatch(n) for p in ignore)]
  if unexpected:
    problems.append(_listed([f"{n} {checkpoint.shape(n)} in {checkpoint.file(n)}"
                             for n in unexpected],
                            f"unexpected tensors in {source} (nothing in our model takes them)"))
  mismatched = []
  for slot in slots:
    if any(n not in checkpoint.tensors for n in slot.sources):
      continue
    ours = [jax.ShapeDtypeStruct(_layer_shape(target[p], slot.index), np.float32)
            for p in slot.targets]
    expected = jax.eval_shape(slot.rule.to_hf, *ours)
    for name, want in zip(slot.sources, expected):
      got = checkpoint.shape(name)
      if tuple(want.shape) != got:
        mismatched.append(f"{name}: shape {got} in {checkpoint.file(name)}, but our "
                          f"{slot.targets[0]} {tuple(target[slot.targets[0]].shape)} needs "
                          f"{tuple(want.shape)}")
  if mismatched:
    problems.append(_listed(mismatched, "shape mismatches"))
  new_patterns = [re.compile(p) for p in new]
  uncovered = [p for p in target if p not in by_leaf]
  kept = [p for p in uncovered if any(r.fullmatch(p) for r in new_patterns)]
  orphans = [p for p in uncovered if p not in kept]
  if orphans:
    problems.append(_listed(orphans, f"our parameters that a {arch.NAME} checkpoint does not "
                            "provide (and that are not declared new)"))
  if problems:
    raise ConversionError(f"cannot import {source} as {arch.NAME}:\n" + "\n".join(problems))

  changes = collections.Counter()
  for path, entries in by_leaf.items():
    ours = str(np.dtype(target[path].dtype))
    for name in {n for slot, _ in entries for n in slot.sources}:
      if checkpoint.dtype(name) != ours:
        changes[(checkpoint.dtype(name), ours)] += 1
  return ImportPlan(checkpoint, dict(target), dict(by_leaf), kept, dict(changes))


def build_leaf(plan: ImportPlan, path: str) -> np.ndarray:
  """Our parameter `path` on the host, in its target dtype."""
  struct = plan.target[path]
  out = np.empty(struct.shape, struct.dtype)
  with jax.default_device(ckpt_lib.host_cpu()):
    for slot, pos in plan.by_leaf[path]:
      arrays = [plan.checkpoint.read(name) for name in slot.sources]
      shapes = [_layer_shape(plan.target[p], slot.index) for p in slot.targets]
      value = np.asarray(slot.rule.to_ours(*arrays, shapes=shapes)[pos])
      if slot.index is None:
        out[...] = value
      else:
        out[slot.index] = value
  return out


def place(host: np.ndarray, struct) -> jax.Array:
  sharding = getattr(struct, "sharding", None)
  if sharding is None:
    return jax.device_put(host)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def load(plan: ImportPlan) -> Iterator[tuple[str, jax.Array]]:
  """Yields (our path, array in its target sharding), one parameter at a time."""
  for path in plan.by_leaf:
    yield path, place(build_leaf(plan, path), plan.target[path])


def describe(plan: ImportPlan) -> str:
  lines = [f"{len(plan.by_leaf)} parameter arrays from {plan.checkpoint.source}"]
  for (src, dst), count in sorted(plan.dtype_changes.items()):
    lines.append(f"dtype change: {count} tensor(s) converted from {src} to {dst}")
  if plan.kept:
    lines.append(f"{len(plan.kept)} new parameter array(s) keep their initialisation, e.g. "
                 f"{plan.kept[:3]}")
  return "; ".join(lines)


# ---------------------------------------------------------------------------------------
# Export.
# ---------------------------------------------------------------------------------------
def _host(array, index) -> np.ndarray:
  if isinstance(array, jax.Array) and not array.is_fully_addressable:
    raise ConversionError("export reads whole parameters in one process; this array spans "
                          "several processes (run the export on one host).")
  return np.asarray(array if index is None else array[index])


def export_tensors(params: Mapping, arch, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, host array) for our (LoRA-free) sub-tree `params`, one tensor at a time;
  every parameter must have a place in the format."""
  flat = flatten(params)
  slots = arch.slots({p: tuple(np.shape(a)) for p, a in flat.items()}, None)
  produced = {p for slot in slots for p in slot.targets}
  left = sorted(set(flat) - produced)
  if left:
    raise ConversionError(_listed(left, f"parameters the {arch.NAME} format has no place for"))
  with jax.default_device(ckpt_lib.host_cpu()):
    for slot in slots:
      ours = [_host(flat[p], slot.index) for p in slot.targets]
      for name, tensor in zip(slot.sources, slot.rule.to_hf(*ours)):
        tensor = np.asarray(tensor)
        if dtype and jax.numpy.issubdtype(tensor.dtype, jax.numpy.floating):  # not ints
          tensor = tensor.astype(dtype)
        yield name, np.ascontiguousarray(tensor)


def export(params: Mapping, arch, directory: str, *, dtype=None,
           max_shard_bytes: int = 2 << 30) -> list[str]:
  """Writes our (LoRA-free) sub-tree `params` as HF tensors into `directory`; returns the
  tensor names. One HF shard is in host memory at a time."""
  writer = ckpt_lib.ShardWriter(directory, max_shard_bytes)
  names = []
  for name, tensor in export_tensors(params, arch, dtype):
    writer.add(name, tensor)
    names.append(name)
  writer.close()
  return names
