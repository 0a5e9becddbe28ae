"""The training loop: every family trains through it, chosen by `config.model.name`."""
import contextlib
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax import flops as flops_lib
from vlm_jax import sharding
from vlm_jax.data import pipeline
from vlm_jax.evaluation import runner as eval_runner
from vlm_jax.models import registry
from vlm_jax.train import checkpoint as checkpoint_lib
from vlm_jax.train import metrics as metrics_lib
from vlm_jax.train import optimizer as optimizer_lib
from vlm_jax.train import state as state_lib
from vlm_jax.train import step as step_lib


class NonFiniteError(RuntimeError):
  """The loss or gradient norm became NaN/inf; the message names the step and checkpoint."""


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def _example_batch_spec(data_iterator, global_batch_size: int) -> dict:
  """Shapes of one global batch, read from the iterator without advancing it."""
  initial = data_iterator.get_state()
  local = next(data_iterator)
  data_iterator.set_state(initial)
  return {k: jax.ShapeDtypeStruct((global_batch_size,) + np.shape(v)[1:], np.asarray(v).dtype)
          for k, v in local.items()}


class Trainer:
  """Holds the mesh, model, sharded state and data; `run()` trains to the configured step."""

  def __init__(self, config, workdir: str, devices=None):
    self.config, self.workdir = config, workdir
    self.mesh = sharding.make_mesh(config.mesh, devices)
    self.rules = sharding.rules_from_config(config)
    self.model = registry.build(config.model)
    self.schedule = optimizer_lib.learning_rate_schedule(config.optimizer, config.num_train_steps)
    self.tx = optimizer_lib.make_optimizer(config)
    self.data = pipeline.make_train_iterator(
        config.data, global_batch_size=config.batch_size, seed=config.data.seed)
    batch_spec = _example_batch_spec(self.data, config.batch_size)
    example = {k: jnp.zeros(s.shape, s.dtype) for k, s in batch_spec.items()}
    with self.mesh_context():
      self.factory = state_lib.StateFactory(self.model, self.tx, config, self.mesh, example)
    self.batch_shardings = {k: sharding.batch_sharding(self.mesh, self.rules, len(s.shape))
                            for k, s in batch_spec.items()}
    self.checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint)
    train_step = step_lib.make_train_step(self.model, self.tx, config, self.schedule)
    repl = sharding.replicated(self.mesh)
    self.train_step = jax.jit(
        train_step,
        in_shardings=(self.factory.shardings, self.batch_shardings, repl),
        out_shardings=(self.factory.shardings, repl),
        donate_argnums=(0,))

  @contextlib.contextmanager
  def mesh_context(self):
    """Mesh and logical rules, needed wherever the model is traced."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  # ------------------------------------------------------------------------------------------
  # State: resume from the newest complete checkpoint, else initialise directly sharded.
  # ------------------------------------------------------------------------------------------
  def initial_state(self):
    latest = self.checkpointer.latest_step()
    with self.mesh_context():
      if latest is not None:
        _log(f"Resuming from checkpoint step {latest} in {self.checkpointer.directory}")
        return self.checkpointer.restore(
            latest, self.factory.abstract_with_shardings(), self.data)
      return self.factory.create(jax.random.key(self.config.seed))

  # ------------------------------------------------------------------------------------------
  # Loop.
  # ------------------------------------------------------------------------------------------
  def run(self):
    config = self.config
    state = self.initial_state()
    writer = metrics_lib.MetricWriter(self.workdir)
    peak, peak_source = metrics_lib.peak_flops_per_device()
    flops_per_step = flops_lib.flops_per_example(config.model, config.data)["train"] * config.batch_size
    progress = metrics_lib.Progress(config.num_train_steps, config.batch_size, flops_per_step,
                                    peak * self.mesh.size)
    _log(f"Model FLOPs per train step {flops_per_step:.3e}; peak {peak * self.mesh.size:.3e} "
         f"FLOP/s ({peak_source}) over {self.mesh.size} device(s), mesh {dict(self.mesh.shape)}")
    rng = jax.random.key(config.seed + 1)
    start = int(state.step)
    pending = []
    try:
      with self.mesh_context():
        for step in range(start + 1, config.num_train_steps + 1):
          batch = sharding.global_batch(next(self.data), self.mesh, self.rules)
          state, step_metrics = self.train_step(state, batch, rng)
          pending.append(step_metrics)
          if step == start + 1:  # keep the first compilation out of the throughput figures
            jax.block_until_ready(state)
            progress.update(start + 1)
          last = step == config.num_train_steps
          if step % config.log_every_steps == 0 or last:
            self._log_metrics(step, state, pending, writer, progress)
            pending = []
          if step % config.checkpoint.every_steps == 0 or last:
            self._check_finite(state)
            self.checkpointer.save(step, state, self.data, force=last)
          if eval_runner.due(config, step):
            scalars = eval_runner.run_configured(self, state)
            writer.write(step, scalars)
            _log(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in scalars.items()))
    finally:
      self.checkpointer.wait()
      writer.close()
    return state

  def _log_metrics(self, step, state, pending, writer, progress):
    self._check_finite(state)
    host = jax.device_get(pending)  # the only host sync, once per logging interval
    scalars = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
    scalars.update(progress.update(step))
    # This process's totals (bad records are skipped where they are read, per process).
    scalars.update({f"data/{k}": v for k, v in pipeline.skipped_record_counts(self.data).items()})
    writer.write(step, scalars)
    _log(progress.line(step, scalars))

  def _check_finite(self, state):
    bad = int(state.nonfinite_step)
    if bad >= 0:
      last = self.checkpointer.latest_step()
      where = (f"the last good checkpoint is step {last} in {self.checkpointer.directory}"
               if last is not None else "no checkpoint was written yet")
      raise NonFiniteError(f"non-finite loss or gradient norm at step {bad + 1}; the update was "
                           f"skipped and training stopped; {where}.")


def train(config, workdir: str, devices=None):
  """Trains `config` in `workdir`, resuming from its newest checkpoint; returns the state."""
  os.makedirs(workdir, exist_ok=True)
  logging.getLogger("absl").setLevel(logging.WARNING)
  return Trainer(config, workdir, devices).run()
