"""The seed systems' released checkpoints: a family's published files imported into our
model in one step, and exported back in the same layout (docs/weights.md).

A release module (`openflamingo`, `minigpt_v2_release`, `prismer_release`,
`cogagent_release`) declares
    NAME, SOURCES        the named inputs; the first is the published checkpoint file
    FAMILY               our model family (`config.model.name`)
    model_config(checkpoint) -> dict
                         config.model's family fields (sub-configs `lm`, `vision`, ...) with
                         the files' hyperparameters (`checkpoint` is a `sources.Combined`
                         whose tensors are named '<source>:<name>')
    example_batch(checkpoint, model) -> a batch to initialise `model` with
    layout(model, checkpoint) -> Layout
                         the rules between our whole parameter tree and the checkpoint's
                         tensors (checkpoint None: export)
    hf_configs(model, params) -> {source: config.json dict} for the sources that have one
    NEW (optional)       {fullmatch regex: reason} for our params the release cannot provide
                         (they keep their initialisation; the import log warns with the reason)
Import checks every tensor before reading any (transfer.plan_import): each published tensor
is used by exactly one of our parameters or ignored on purpose (IGNORE, with the reason in
the module), and each of our parameters comes from the files.
"""
import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax

from vlm_jax import config as config_lib
from vlm_jax.convert import checkpoint as ckpt_lib
from vlm_jax.convert import sources, transfer
from vlm_jax.convert.checkpoint import ConversionError
from vlm_jax.models import registry


@dataclasses.dataclass(frozen=True)
class Layout:
  """What `transfer` needs of an architecture: NAME, IGNORE and slots(paths, names)."""
  NAME: str
  IGNORE: tuple[str, ...]
  slots: Callable


def open_sources(release, paths: Mapping[str, str]):
  """The release's files as one checkpoint; `paths` maps each of release.SOURCES to a file
  or directory (torch files are read with weights_only=True, see sources.py)."""
  missing = [s for s in release.SOURCES if not paths.get(s)]
  if missing:
    raise ConversionError(f"{release.NAME}: sources {missing} are missing (it reads "
                          f"{list(release.SOURCES)}).")
  unknown = sorted(set(paths) - set(release.SOURCES))
  if unknown:
    raise ConversionError(f"{release.NAME}: unknown sources {unknown} (it reads "
                          f"{list(release.SOURCES)}).")
  return sources.Combined({s: sources.open_checkpoint(paths[s]) for s in release.SOURCES})


def target_of(model, batch) -> dict:
  """'/'-path -> ShapeDtypeStruct of the model's parameters (nothing is allocated)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), batch))["params"]
  return transfer.flatten(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                       nn.meta.unbox(shapes)))


def load(release, checkpoint, model, target: Mapping, log=print) -> dict:
  """'/'-path -> array (in each target's sharding) for every parameter the files provide;
  those the release cannot provide (`release.NEW`, with its reason in the module) are left
  out and named in the log."""
  new = getattr(release, "NEW", {})
  plan = transfer.plan_import(checkpoint, release.layout(model, checkpoint), target, tuple(new))
  with checkpoint:
    loaded = dict(transfer.load(plan))
  log(f"Imported {transfer.describe(plan)}")
  for pattern, reason in new.items():
    count = sum(bool(re.fullmatch(pattern, p)) for p in plan.kept)
    if count:
      log(f"WARNING: {count} parameter arrays {pattern} keep their initialisation: {reason}")
  return loaded


def initialise(model, batch, paths) -> dict:
  """'/'-path -> array: the model's initialisation of `paths` only (jit drops the rest)."""
  def init():
    params = transfer.flatten(nn.meta.unbox(model.init(jax.random.key(0), batch)["params"]))
    return {p: params[p] for p in paths}
  return jax.jit(init)()


def build(release, checkpoint, overrides: Mapping | None = None):
  """(model, example batch): the release's family built from `release.model_config` with
  `overrides` (dotted config.model keys -> value, e.g. {'vision.num_heads': 4,
  'scan_layers': False}) for what the files do not determine."""
  model_config = config_lib.base_config(release.FAMILY).model
  model_config.update(release.model_config(checkpoint))
  for key, value in (overrides or {}).items():
    *parents, field = key.split(".")
    node = model_config
    for parent in parents:
      if parent not in node:
        raise ConversionError(f"{release.NAME}: override {key!r}: config.model has no "
                              f"{parent!r} (it has {sorted(node)}).")
      node = node[parent]
    try:
      node[field] = value
    except TypeError as e:  # ml_collections keeps a field's type
      raise ConversionError(f"{release.NAME}: override {key!r}: {e}") from None
  try:
    model = registry.build(model_config)
  except config_lib.ConfigError as e:  # an override that is not a field of the model
    raise ConversionError(f"{release.NAME}: {e}") from None
  return model, release.example_batch(checkpoint, model)


def import_released(release, paths: Mapping[str, str], overrides: Mapping | None = None, *,
                    log=print):
  """(our model, its params) from a release's files: `paths` maps each source to a path;
  `overrides` set config.model fields the files do not determine (see `build`). Parameters
  the release cannot provide keep the model's initialisation (the log names them)."""
  checkpoint = open_sources(release, paths)
  model, batch = build(release, checkpoint, overrides)
  target = target_of(model, batch)
  loaded = load(release, checkpoint, model, target, log)
  missing = sorted(set(target) - set(loaded))
  return model, transfer.unflatten({**loaded, **initialise(model, batch, missing)})


def export_released(release, params: Mapping, model, directory: str, *, dtype=None,
                    max_shard_bytes: int = 2 << 30) -> dict[str, list[str]]:
  """Writes `params` in the release's layout: one sub-directory per source holding its
  tensors as safetensors (shards + index when large) and, where the source has one, its
  config.json. Params the release has no place for (`release.NEW`) are left out. Returns
  source -> tensor names."""
  new = [re.compile(p) for p in getattr(release, "NEW", {})]
  params = transfer.unflatten({p: a for p, a in transfer.flatten(params).items()
                               if not any(r.fullmatch(p) for r in new)})
  writers, names = {}, {}
  for name, tensor in transfer.export_tensors(params, release.layout(model, None), dtype):
    source, _, inner = name.partition(":")
    if source not in writers:
      writers[source] = ckpt_lib.ShardWriter(os.path.join(directory, source), max_shard_bytes)
      names[source] = []
    writers[source].add(inner, tensor)
    names[source].append(inner)
  for writer in writers.values():
    writer.close()
  for source, config in release.hf_configs(model, params).items():
    with open(os.path.join(directory, source, ckpt_lib.CONFIG), "w") as f:
      json.dump(config, f, indent=2)
  return names


def consumers(release, checkpoint, model, target: Mapping) -> dict[str, list[tuple]]:
  """tensor name -> the target tuples of the rules that read it (after the import checks):
  which of our parameters each published tensor feeds."""
  plan = transfer.plan_import(checkpoint, release.layout(model, checkpoint), target,
                              tuple(getattr(release, "NEW", {})))
  used, seen = {}, set()
  for entries in plan.by_leaf.values():
    for slot, _ in entries:
      if id(slot) not in seen:
        seen.add(id(slot))
        for name in slot.sources:
          used.setdefault(name, []).append(slot.targets)
  return used
