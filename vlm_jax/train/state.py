"""Train state with trainable and frozen parameters kept apart, initialised already sharded.

Frozen sub-trees (config.frozen regexes and the family's STATISTICS) live outside the
differentiated tree, so no gradient is ever computed for them and the optimizer holds no
moments for them.
"""
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vlm_jax import params as params_lib
from vlm_jax import sharding
from vlm_jax.config import ConfigError


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # trainable
  frozen: Any  # not differentiated
  opt_state: Any
  # First step whose loss or gradient norm was not finite (-1: none). Such steps leave the
  # parameters untouched, so the host can check this only on logging steps (no per-step sync).
  nonfinite_step: jax.Array


class StateFactory:
  """Builds the abstract state, its shardings, and the state itself directly sharded."""

  def __init__(self, model, tx: optax.GradientTransformation, config, mesh, example_batch):
    self.model, self.tx, self.config, self.mesh = model, tx, config, mesh
    self.rules = sharding.rules_from_config(config)
    self._example_batch = example_batch
    boxed = params_lib.boxed_abstract(model, example_batch)
    self.abstract_params = params_lib.strip_boxes(boxed)
    missing = params_lib.unmatched_patterns(self.abstract_params, config.frozen)
    if missing:
      some = list(params_lib.flatten(self.abstract_params))[:3]
      raise ConfigError(f"config.frozen: pattern(s) {missing} match no parameter; fix or "
                        f"remove them (parameter paths look like {some}).")
    param_shardings = sharding.logical_shardings(boxed, mesh, self.rules)
    trainable_sh, frozen_sh = params_lib.split_frozen(param_shardings,
                                                      params_lib.frozen_patterns(config))
    self.abstract_state = jax.eval_shape(self._init_state, jax.random.key(0))
    repl = sharding.replicated(mesh)
    opt_sh = optax.tree_utils.tree_map_params(
        tx, lambda _, s: s, self.abstract_state.opt_state, trainable_sh,
        transform_non_params=lambda _: repl)
    self.shardings = TrainState(step=repl, params=trainable_sh, frozen=frozen_sh,
                                opt_state=opt_sh, nonfinite_step=repl)

  def _init_state(self, rng) -> TrainState:
    params = nn.unbox(params_lib.init_boxed(self.model, self._example_batch, rng))
    trainable, frozen = params_lib.split_frozen(params, params_lib.frozen_patterns(self.config))
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, frozen=frozen,
                      opt_state=self.tx.init(trainable),
                      nonfinite_step=jnp.full((), -1, jnp.int32))

  def create(self, rng) -> TrainState:
    return jax.jit(self._init_state, out_shardings=self.shardings)(rng)

  def create_with_params(self, params) -> TrainState:
    """A step-0 state around complete `params` (placed in their shardings) with a fresh
    optimizer state, without initialising (and then discarding) a random model."""
    trainable, frozen = params_lib.split_frozen(params, params_lib.frozen_patterns(self.config))
    counters = jax.jit(lambda: (jnp.zeros((), jnp.int32), jnp.full((), -1, jnp.int32)),
                       out_shardings=(self.shardings.step, self.shardings.nonfinite_step))()
    opt_state = jax.jit(self.tx.init, out_shardings=self.shardings.opt_state)(trainable)
    return TrainState(step=counters[0], params=trainable, frozen=frozen, opt_state=opt_state,
                      nonfinite_step=counters[1])

  def abstract_with_shardings(self) -> TrainState:
    """ShapeDtypeStructs carrying the target shardings (for orbax restore)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract_state, self.shardings)
