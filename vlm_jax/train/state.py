"""Train state with trainable and frozen parameters kept apart, initialised already sharded.

Frozen sub-trees (config.frozen regexes) live outside the differentiated tree, so no gradient
is ever computed for them and the optimizer holds no moments for them.
"""
import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

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


def split_frozen(params, frozen_patterns) -> tuple[dict, dict]:
  """Splits a param tree into (trainable, frozen) nested dicts by '/'-path regexes."""
  compiled = [re.compile(p) for p in frozen_patterns]
  flat = traverse_util.flatten_dict(params, sep="/")
  frozen = {k: v for k, v in flat.items() if any(c.fullmatch(k) for c in compiled)}
  trainable = {k: v for k, v in flat.items() if k not in frozen}
  unflatten = lambda d: traverse_util.unflatten_dict(d, sep="/")
  return unflatten(trainable), unflatten(frozen)


def merge_params(trainable, frozen) -> dict:
  flat = traverse_util.flatten_dict(trainable, sep="/")
  flat.update(traverse_util.flatten_dict(frozen, sep="/"))
  return traverse_util.unflatten_dict(flat, sep="/")


def unmatched_patterns(params, frozen_patterns) -> list[str]:
  keys = traverse_util.flatten_dict(params, sep="/").keys()
  return [p for p in frozen_patterns if not any(re.fullmatch(p, k) for k in keys)]


def strip_boxes(tree):
  """Removes `nn.Partitioned` boxes without applying sharding constraints (usable eagerly)."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree,
                      is_leaf=is_box)


class StateFactory:
  """Builds the abstract state, its shardings, and the state itself directly sharded."""

  def __init__(self, model, tx: optax.GradientTransformation, config, mesh, example_batch):
    self.model, self.tx, self.config, self.mesh = model, tx, config, mesh
    self.rules = sharding.rules_from_config(config)
    self._example_batch = example_batch
    boxed = jax.eval_shape(self._init_boxed_params, jax.random.key(0))
    self.abstract_params = strip_boxes(boxed)
    missing = unmatched_patterns(self.abstract_params, config.frozen)
    if missing:
      some = list(traverse_util.flatten_dict(self.abstract_params, sep="/"))[:3]
      raise ConfigError(f"config.frozen: pattern(s) {missing} match no parameter; fix or "
                        f"remove them (parameter paths look like {some}).")
    param_shardings = sharding.logical_shardings(boxed, mesh, self.rules)
    trainable_sh, frozen_sh = split_frozen(param_shardings, config.frozen)
    self.abstract_state = jax.eval_shape(self._init_state, jax.random.key(0))
    repl = sharding.replicated(mesh)
    opt_sh = optax.tree_utils.tree_map_params(
        tx, lambda _, s: s, self.abstract_state.opt_state, trainable_sh,
        transform_non_params=lambda _: repl)
    self.shardings = TrainState(step=repl, params=trainable_sh, frozen=frozen_sh,
                                opt_state=opt_sh, nonfinite_step=repl)

  def _init_boxed_params(self, rng):
    params_rng, dropout_rng = jax.random.split(rng)
    variables = self.model.init({"params": params_rng, "dropout": dropout_rng},
                                self._example_batch, deterministic=True)
    return variables["params"]

  def _init_state(self, rng) -> TrainState:
    params = nn.unbox(self._init_boxed_params(rng))
    trainable, frozen = split_frozen(params, self.config.frozen)
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, frozen=frozen,
                      opt_state=self.tx.init(trainable),
                      nonfinite_step=jnp.full((), -1, jnp.int32))

  def create(self, rng) -> TrainState:
    return jax.jit(self._init_state, out_shardings=self.shardings)(rng)

  def abstract_with_shardings(self) -> TrainState:
    """ShapeDtypeStructs carrying the target shardings (for orbax restore)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract_state, self.shardings)
