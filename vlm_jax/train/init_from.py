"""`config.init_from`: start a run from another run's parameters (e.g. the previous stage's).

Only parameters carry over: trainable and frozen are matched by '/'-joined path regardless of
which side of the split they were on in the other run (its config.frozen may differ), and read
straight into this run's shardings and dtypes (orbax partial restore: nothing else is read, no
host copy of the whole tree). The step, optimizer state and data iterator start fresh.
Parameters the checkpoint lacks keep their initialisation; a shape mismatch is an error.
"""
import jax

from vlm_jax import params as params_lib
from vlm_jax.train.state import TrainState


class InitFromError(ValueError):
  """config.init_from names no usable checkpoint, or one that does not fit the model."""


def initial_state(path: str, factory, rng, log=print) -> TrainState:
  """A fresh state (step 0, new optimizer state) whose parameters come from `path`."""
  state = factory.create(rng)
  abstract = factory.abstract_with_shardings()
  target = {**params_lib.flatten(abstract.params), **params_lib.flatten(abstract.frozen)}
  try:
    loaded, step = params_lib.read_checkpoint(path, target)
  except params_lib.CheckpointParamsError as e:
    raise InitFromError(f"config.init_from: {e}") from None
  if not loaded:
    raise InitFromError(f"config.init_from={path!r} (step {step}): none of its parameter paths "
                        f"exist in this model (e.g. {sorted(target)[:3]}); another family?")
  kept = sorted(set(target) - set(loaded))
  log(f"Initialised {len(loaded)} of {len(target)} parameter arrays from {path} (step {step})"
      + (f"; {len(kept)} keep their initialisation: {kept[:5]}" if kept else ""))
  return with_params(factory, state, loaded)


def with_params(factory, state: TrainState, loaded: dict) -> TrainState:
  """`state` with the parameters in `loaded` ('/'-path -> array, either side of the split)
  and a fresh optimizer state for them."""
  replace = lambda tree: params_lib.unflatten(
      {k: loaded.get(k, v) for k, v in params_lib.flatten(tree).items()})
  params, frozen = replace(state.params), replace(state.frozen)
  opt_state = jax.jit(factory.tx.init, out_shardings=factory.shardings.opt_state)(params)
  return state.replace(params=params, frozen=frozen, opt_state=opt_state)
