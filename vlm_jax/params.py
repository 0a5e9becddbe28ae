"""Parameter trees: the frozen/trainable split, abstract parameters with their shardings,
and parameters read from a run's checkpoint, one place each (used by training, evaluation,
vlm-info, vlm-convert and the notebooks).

Paths are '/'-joined (`lm/layers/layers/self_attention/query/kernel`); `config.frozen`
regexes fullmatch them.
"""
import re

import flax.linen as nn
import jax
from flax import traverse_util

from vlm_jax import sharding
from vlm_jax import storage
from vlm_jax.models import registry


def flatten(tree) -> dict:
  return traverse_util.flatten_dict(tree or {}, sep="/")


def unflatten(flat: dict) -> dict:
  return traverse_util.unflatten_dict(flat, sep="/")


def split_frozen(params, frozen_patterns) -> tuple[dict, dict]:
  """Splits a param tree into (trainable, frozen) nested dicts by '/'-path regexes."""
  compiled = [re.compile(p) for p in frozen_patterns]
  flat = flatten(params)
  frozen = {k: v for k, v in flat.items() if any(c.fullmatch(k) for c in compiled)}
  trainable = {k: v for k, v in flat.items() if k not in frozen}
  return unflatten(trainable), unflatten(frozen)


def frozen_patterns(config) -> tuple[str, ...]:
  """What the train state keeps frozen: config.frozen plus the family's STATISTICS (params
  that hold statistics, e.g. BatchNorm running mean/var, which no optimizer may update). A
  config that names no family (a module built by hand) has no STATISTICS."""
  statistics = registry.statistics(config.model) if config.model.get("name") else ()
  return tuple(config.frozen) + statistics


def merge_params(trainable, frozen) -> dict:
  return unflatten({**flatten(trainable), **flatten(frozen)})


def unmatched_patterns(params, frozen_patterns) -> list[str]:
  keys = flatten(params).keys()
  return [p for p in frozen_patterns if not any(re.fullmatch(p, k) for k in keys)]


def strip_boxes(tree):
  """Removes `nn.Partitioned` boxes without applying sharding constraints (usable eagerly)."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree,
                      is_leaf=is_box)


def init_boxed(model, example_batch, rng):
  """The model's initial parameters, boxed with their logical axes (`nn.Partitioned`)."""
  params_rng, dropout_rng = jax.random.split(rng)
  return model.init({"params": params_rng, "dropout": dropout_rng}, example_batch,
                    deterministic=True)["params"]


def boxed_abstract(model, example_batch):
  """`init_boxed` under jax.eval_shape: shapes, dtypes and logical axes, no allocation."""
  return jax.eval_shape(lambda rng: init_boxed(model, example_batch, rng), jax.random.key(0))


def abstract_with_shardings(config, mesh, model=None) -> dict:
  """'/'-path -> ShapeDtypeStruct carrying the sharding the config's rules give on `mesh`
  (nothing is allocated)."""
  model = model or registry.build(config.model)
  boxed = boxed_abstract(model, registry.dummy_batch(config, 1))
  shardings = flatten(sharding.logical_shardings(boxed, mesh, sharding.rules_from_config(config)))
  return {p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shardings[p])
          for p, s in flatten(strip_boxes(boxed)).items()}


class CheckpointParamsError(ValueError):
  """A run's checkpoint is missing, or does not fit the parameters asked for."""


def _manager(path: str):
  """An orbax manager over `path` (a run's workdir or its checkpoints/ dir) that writes
  nothing, with a finished checkpoint."""
  import grain  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  for directory in (storage.join(path, "checkpoints"), path):
    if storage.isdir(directory):
      manager = ocp.CheckpointManager(
          storage.abspath(directory), options=ocp.CheckpointManagerOptions(create=False),
          item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                         "data": grain.checkpoint.CheckpointHandler()})
      if manager.latest_step() is not None:
        return manager
      manager.close()
  raise CheckpointParamsError(f"{path!r}: no finished checkpoint there or in its "
                              "checkpoints/ directory (expected a run's --workdir).")


def read_checkpoint(path: str, target: dict, step: int | None = None) -> tuple[dict, int]:
  """Reads a run's parameters that `target` also has, from either side of its train state
  (trainable or frozen: the split may differ from this config's), straight into the
  target's shardings and dtypes (orbax partial restore; nothing else is read).

  target: '/'-path -> ShapeDtypeStruct with a sharding. Returns ('/'-path -> jax.Array for
  the paths found, the step read: `step` or the newest). A shape mismatch is an error.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager = _manager(path)
  try:
    step = manager.latest_step() if step is None else step
    if step not in manager.all_steps():
      raise CheckpointParamsError(f"{path!r}: no checkpoint for step {step} (have "
                                  f"{manager.all_steps()}).")
    saved = manager.item_metadata(step)["state"]
    saved = getattr(saved, "tree", saved)  # TreeMetadata -> nested dict of ArrayMetadata
    item = {}
    for side in ("params", "frozen"):
      for key, meta in flatten(saved.get(side)).items():
        if key not in target:
          continue
        if tuple(meta.shape) != tuple(target[key].shape):
          raise CheckpointParamsError(
              f"{path!r} (step {step}): parameter {key!r} has shape {tuple(meta.shape)} "
              f"there but {tuple(target[key].shape)} in this model.")
        item.setdefault(side, {})[key] = target[key]
    if not item:
      return {}, step
    item = {side: unflatten(flat) for side, flat in item.items()}
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)))["state"]
  finally:
    manager.close()
  return {p: a for side in restored for p, a in flatten(restored[side]).items()}, step
