"""The training loop: every family trains through it, found by `config.model.name`."""
import contextlib
import logging
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax import distributed
from vlm_jax import flops as flops_lib
from vlm_jax import sharding
from vlm_jax import storage
from vlm_jax.data import pipeline
from vlm_jax.evaluation import runner as eval_runner
from vlm_jax.models import registry
from vlm_jax.train import checkpoint as checkpoint_lib
from vlm_jax.train import compilation_cache
from vlm_jax.train import goodput as goodput_lib
from vlm_jax.train import init_from as init_from_lib
from vlm_jax.train import init_weights
from vlm_jax.train import metrics as metrics_lib
from vlm_jax.train import nonfinite
from vlm_jax.train import optimizer as optimizer_lib
from vlm_jax.train import phases
from vlm_jax.train import preemption
from vlm_jax.train import profiling
from vlm_jax.train import state as state_lib
from vlm_jax.train import step as step_lib
from vlm_jax.train import validate
from vlm_jax.train import wandb_writer
from vlm_jax.train import watchdog as watchdog_lib

NonFiniteError = nonfinite.NonFiniteError


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
    validate.check_config(config, len(devices if devices is not None else jax.devices()),
                          jax.process_count())
    validate.check_workdir_writable(workdir)
    cache = compilation_cache.configure(config, workdir)
    _log(f"Persistent compilation cache: {cache or 'off'}")
    self.profiler = profiling.StepProfiler(config.profile, workdir, jax.process_index(), _log)
    wandb_writer.check_mode(config.wandb)
    self.mesh = sharding.make_mesh(config.mesh, devices)
    self.rules = sharding.rules_from_config(config)
    self.model = registry.build(config.model)
    self.schedule = optimizer_lib.learning_rate_schedule(config.optimizer, config.num_train_steps)
    self.tx = optimizer_lib.make_optimizer(config)
    self.data = pipeline.make_train_iterator(
        config.data, config.model.name, global_batch_size=config.batch_size,
        seed=config.data.seed)
    batch_spec = _example_batch_spec(self.data, config.batch_size)
    example = {k: jnp.zeros(s.shape, s.dtype) for k, s in batch_spec.items()}
    with self.mesh_context():
      self.factory = state_lib.StateFactory(self.model, self.tx, config, self.mesh, example)
    self.batch_shardings = {k: sharding.batch_sharding(self.mesh, self.rules, len(s.shape))
                            for k, s in batch_spec.items()}
    validate.check_free_space(workdir, _nbytes(self.factory.abstract_state))
    self.checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint)
    train_step = step_lib.make_train_step(self.model, self.tx, config, self.schedule)
    repl = sharding.replicated(self.mesh)
    self.train_step = distributed.jit(
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
  # State: resume from the newest complete checkpoint, else initialise directly sharded
  # (parameters from config.init_from, another run's checkpoint, when it names one;
  # else pretrained parts from config.init imported over the initialisation).
  # ------------------------------------------------------------------------------------------
  def initial_state(self):
    with self.mesh_context():
      step, state = self.checkpointer.restore_newest(
          self.factory.abstract_with_shardings(), self.data)
      if step is not None:
        _log(f"Resuming from checkpoint step {step} in {self.checkpointer.directory}")
        return state
      rng = jax.random.key(self.config.seed)
      if self.config.init_from:  # a previous stage: it already holds any imported weights
        return init_from_lib.initial_state(self.config.init_from, self.factory, rng, _log)
      state = self.factory.create(rng)
      return init_weights.apply(self.config, self.model, self.factory, state, _log)

  # ------------------------------------------------------------------------------------------
  # Loop.
  # ------------------------------------------------------------------------------------------
  def run(self):
    """Trains to `num_train_steps`. Raises preemption.Preempted after saving on a preemption
    notice, NonFiniteError per config.nonfinite, CheckpointSaveError if a save fails; exits
    the process with watchdog.EXIT_HUNG if the loop hangs."""
    self.clock = phases.PhaseClock(process_index=jax.process_index())
    self.goodput = goodput_lib.Goodput(self.clock, storage.join(self.workdir, "metrics.jsonl"))
    hang_watch = watchdog_lib.Watchdog(
        self.clock, self.config.watchdog, storage.join(self.workdir, watchdog_lib.HANG_REPORTS),
        jax.process_index(), jax.process_count())
    try:
      return self._run()
    finally:
      hang_watch.stop()

  def _run(self):
    config, clock = self.config, self.clock
    resuming = self.checkpointer.latest_step() is not None
    if resuming:
      clock.disarm_stall()
    with clock.phase("restore" if resuming else "init", 0):
      state = self.initial_state()
    self.goodput.begin_attempt(int(state.step))
    with clock.phase("startup", 0):
      writer = wandb_writer.make_writer(config, self.workdir, jax.process_index())
      peak, peak_source = metrics_lib.peak_flops(self.mesh.size)
    flops_per_step = flops_lib.flops_per_example(
        config, flops_lib.config_treatment(config))["train"] * config.batch_size
    progress = metrics_lib.Progress(config.num_train_steps, config.batch_size, flops_per_step,
                                    peak)
    _log(f"Model FLOPs per train step {flops_per_step:.3e}; peak {peak:.3e} "
         f"FLOP/s ({peak_source}) over {self.mesh.size} device(s), mesh {dict(self.mesh.shape)}")
    self.guard = nonfinite.Guard(config.nonfinite, self.checkpointer)
    self.guard.resumed_at = int(state.step)
    self.inject = nonfinite.Injector()
    watch = preemption.PreemptionWatch()
    try:
      while True:
        try:
          return self._train(state, writer, progress, watch)
        except nonfinite.Rewind as rewind:
          state = self._rewind(rewind)
    finally:
      watch.close()
      self.profiler.stop()
      try:
        with clock.phase("checkpoint", 0):
          self.checkpointer.wait()
      finally:
        self._print_times()
        writer.close()

  def _train(self, state, writer, progress, watch):
    config = self.config
    rng = jax.random.key(config.seed + 1)
    start = int(state.step)
    pending, fetched = [], []  # per-step metrics on device / already on the host
    with self.mesh_context():
      for step in range(start + 1, config.num_train_steps + 1):
        first = step == start + 1
        with self.clock.phase("data", step):
          batch = sharding.global_batch(self.inject(step, next(self.data)), self.mesh,
                                        self.rules)
        with self.clock.phase("compile" if first else "dispatch", step), \
            self.profiler.step(step):
          state, step_metrics = self.train_step(state, batch, rng)
          if first:  # keep the first compilation out of the throughput figures
            jax.block_until_ready(state)
        self.profiler.after(step, state)
        pending.append((step, step_metrics))
        if first:
          _log(self.goodput.first_step_done())
          progress.update(start + 1)
        last = step == config.num_train_steps
        notice = None if last else watch.notice(step, self.checkpointer.manager)
        log_now = step % config.log_every_steps == 0 or last or notice
        save_now = step % config.checkpoint.every_steps == 0 or last or notice
        if log_now or save_now:
          with self.clock.phase("device", step, units=len(pending)):
            new, pending = self._fetch(pending), []
          fetched += new
          if log_now:
            with self.clock.phase("log", step):  # sums the data counters over processes
              self._log_metrics(step, [m for _, m in fetched], writer, progress)
            fetched = []
          self._apply_policy(state, new)
        if save_now and self.guard.may_checkpoint():
          with self.clock.phase("checkpoint", step):
            self.checkpointer.save(step, state, self.data, force=last or bool(notice))
        if eval_runner.due(config, step):
          with self.clock.phase("eval", step):
            scalars = eval_runner.run_configured(self, state)
          writer.write(step, scalars)
          _log(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in scalars.items()))
        if notice:
          raise preemption.Preempted(step, self.checkpointer.finished_step(), notice,
                                     self.checkpointer.directory)
    return state

  @staticmethod
  def _fetch(pending):
    """[(step, host metrics)]: the only host sync, once per logging or checkpoint interval."""
    return list(zip([s for s, _ in pending], jax.device_get([m for _, m in pending])))

  def _apply_policy(self, state, fetched):
    self.guard.check_state(state)
    self.guard.observe([s for s, _ in fetched], [bool(m["nonfinite"]) for _, m in fetched])

  def _rewind(self, rewind):
    step = self.checkpointer.finished_step()
    _log(f"Rewinding to checkpoint step {step} after non-finite steps {rewind.first_bad}-"
         f"{rewind.last_bad} (rewind {self.guard.rewinds} of at most "
         f"{self.config.nonfinite.max_rewinds}); the data iterator is not rewound.")
    with self.mesh_context(), self.clock.phase("restore", step):
      state = self.checkpointer.restore(step, self.factory.abstract_with_shardings(), None)
    self.goodput.begin_attempt(step)
    return state

  def _log_metrics(self, step, host, writer, progress):
    good = [m for m in host if not m["nonfinite"]] or host  # skipped steps would make NaN means
    scalars = {k: float(np.mean([m[k] for m in good])) for k in host[0]}
    scalars["nonfinite"] = float(sum(m["nonfinite"] for m in host))
    scalars.update(progress.update(step))
    # The job's totals: each process counts the records it reads and skips.
    counts = pipeline.with_rates(distributed.sum_over_processes(self.data.counters))
    scalars.update({f"data/{k}": v for k, v in counts.items()})
    scalars.update(self.goodput.scalars(step))
    writer.write(step, scalars)
    _log(progress.line(step, scalars))

  def _print_times(self):
    """The run's time accounts up to now, the final checkpoint included (the last metric
    record has them up to its step; after a failure, the next process counts the rest as
    `restart` time)."""
    if self.goodput.first_step_s is not None:
      _log(f"Time: {goodput_lib.summary(self.goodput.totals())}; launch to first step "
           f"{self.goodput.first_step_s:.1f} s")


def _nbytes(abstract_tree) -> int:
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(abstract_tree))


def train(config, workdir: str, devices=None):
  """Trains `config` in `workdir`, resuming from its newest checkpoint; returns the state."""
  storage.makedirs(workdir)
  logging.getLogger("absl").setLevel(logging.WARNING)
  return Trainer(config, workdir, devices).run()
