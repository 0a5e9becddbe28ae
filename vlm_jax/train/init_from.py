"""`config.init_from`: start a run from another run's parameters (e.g. the previous stage's).

Only parameters carry over: trainable and frozen are matched by '/'-joined path regardless of
which side of the split they were on in the other run (its config.frozen may differ), and read
straight into this run's shardings and dtypes (orbax partial restore: nothing else is read, no
host copy of the whole tree). The step, optimizer state and data iterator start fresh.
Parameters the checkpoint lacks keep their initialisation; a shape mismatch is an error.
"""
import os

import grain
import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from vlm_jax.train.state import TrainState


class InitFromError(ValueError):
  """config.init_from names no usable checkpoint, or one that does not fit the model."""


def _flat(tree) -> dict:
  return traverse_util.flatten_dict(tree or {}, sep="/")


def _manager(path: str) -> ocp.CheckpointManager:
  """A manager over `path` (a run's workdir or its checkpoints/ dir) that writes nothing."""
  for directory in (os.path.join(path, "checkpoints"), path):
    if os.path.isdir(directory):
      manager = ocp.CheckpointManager(
          os.path.abspath(directory),
          options=ocp.CheckpointManagerOptions(create=False),
          item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                         "data": grain.checkpoint.CheckpointHandler()})
      if manager.latest_step() is not None:
        return manager
      manager.close()
  raise InitFromError(f"config.init_from={path!r}: no finished checkpoint there or in its "
                      f"checkpoints/ directory (expected a previous run's --workdir).")


def load_params(path: str, target: dict) -> tuple[dict, int]:
  """Reads the newest checkpoint's parameters that `target` also has.

  target: '/'-path -> ShapeDtypeStruct with the sharding to restore into. Returns
  ('/'-path -> jax.Array for the paths found, the checkpoint's step).
  """
  manager = _manager(path)
  try:
    return _restore(manager, path, target)
  finally:
    manager.close()


def _restore(manager, path: str, target: dict) -> tuple[dict, int]:
  step = manager.latest_step()
  saved = manager.item_metadata(step)["state"]
  saved = getattr(saved, "tree", saved)  # TreeMetadata -> nested dict of ArrayMetadata
  item = {}
  for side in ("params", "frozen"):
    for key, meta in _flat(saved.get(side)).items():
      if key not in target:
        continue
      if tuple(meta.shape) != tuple(target[key].shape):
        raise InitFromError(
            f"config.init_from={path!r} (step {step}): parameter {key!r} has shape "
            f"{tuple(meta.shape)} there but {tuple(target[key].shape)} in this model.")
      item.setdefault(side, {})[key] = target[key]
  if not item:
    raise InitFromError(f"config.init_from={path!r} (step {step}): none of its parameter paths "
                        f"exist in this model (e.g. {sorted(target)[:3]}); another family?")
  item = {side: traverse_util.unflatten_dict(flat, sep="/") for side, flat in item.items()}
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True)))["state"]
  loaded = {}
  for side in item:
    loaded.update(_flat(restored[side]))
  return loaded, step


def initial_state(path: str, factory, rng, log=print) -> TrainState:
  """A fresh state (step 0, new optimizer state) whose parameters come from `path`."""
  state = factory.create(rng)
  abstract = factory.abstract_with_shardings()
  target = {**_flat(abstract.params), **_flat(abstract.frozen)}
  loaded, step = load_params(path, target)
  replace = lambda tree: traverse_util.unflatten_dict(
      {k: loaded.get(k, v) for k, v in _flat(tree).items()}, sep="/")
  params, frozen = replace(state.params), replace(state.frozen)
  opt_state = jax.jit(factory.tx.init, out_shardings=factory.shardings.opt_state)(params)
  kept = sorted(set(target) - set(loaded))
  log(f"Initialised {len(loaded)} of {len(target)} parameter arrays from {path} (step {step})"
      + (f"; {len(kept)} keep their initialisation: {kept[:5]}" if kept else ""))
  return state.replace(params=params, frozen=frozen, opt_state=opt_state)
