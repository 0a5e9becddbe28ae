"""What to do when the loss or gradient norm is NaN/inf: `config.nonfinite.policy`.

The train step never applies a non-finite update (it keeps the old params and optimizer state,
train/step.py) and reports a per-step `nonfinite` flag, so the host only looks at logging and
checkpoint steps (no per-step synchronisation):

- "stop": raise NonFiniteError naming the first bad step and the last good checkpoint.
- "skip": count skipped updates and keep training. After `rewind_after` consecutive bad steps
  the parameters themselves are suspect (every batch now fails), so the state rewinds to the
  last checkpoint while the data iterator keeps going: the batches seen since that checkpoint
  are not replayed (PaLM's recipe for loss spikes). After `max_rewinds` rewinds it stops as
  "stop" does. A checkpoint is never written while a run of bad steps is in progress, so a
  rewind never lands on the suspect parameters.

Fault injection for tests/reliability: VLM_JAX_INJECT_NONFINITE_STEPS="7,12" makes the batch
of each listed step carry a NaN loss weight the first time that step runs in the process.
"""
import os

import jax
import numpy as np

POLICIES = ("stop", "skip")
INJECT_ENV = "VLM_JAX_INJECT_NONFINITE_STEPS"


class NonFiniteError(RuntimeError):
  """The loss or gradient norm became NaN/inf; the message names the step and checkpoint."""


class Rewind(Exception):
  """Raised by the guard; the loop restores the last checkpoint's state and goes on."""

  def __init__(self, first_bad: int, last_bad: int):
    self.first_bad, self.last_bad = first_bad, last_bad
    super().__init__(f"steps {first_bad}-{last_bad} were all non-finite")


def _where(checkpointer) -> str:
  last = checkpointer.finished_step()
  return (f"the last good checkpoint is step {last} in {checkpointer.directory}"
          if last is not None else "no checkpoint was written yet")


class Guard:
  """Host-side bookkeeping of skipped steps; `observe` runs once per logging interval."""

  def __init__(self, nonfinite_config, checkpointer):
    self.policy = nonfinite_config.policy
    self.rewind_after = nonfinite_config.rewind_after
    self.max_rewinds = nonfinite_config.max_rewinds
    self.checkpointer = checkpointer
    self.skipped = 0  # in this process, rewound steps included
    # A state restored from a "skip" run may carry an old nonfinite_step; "stop" looks only at
    # steps this process trained.
    self.resumed_at = 0
    self.rewinds = 0
    self.streak_start, self.streak = None, 0

  def check_state(self, state) -> None:
    """Policy "stop": raise if any step so far was non-finite (one scalar read)."""
    if self.policy != "stop":
      return
    bad = int(state.nonfinite_step)
    if bad >= self.resumed_at:
      raise NonFiniteError(f"non-finite loss or gradient norm at step {bad + 1}; the update was "
                           f"skipped and training stopped; {_where(self.checkpointer)}. "
                           "config.nonfinite.policy=skip skips such steps instead.")

  def observe(self, steps, flags) -> None:
    """Steps and their host `nonfinite` flags, in order. Raises Rewind or NonFiniteError."""
    if self.policy != "skip":
      return
    for step, bad in zip(steps, flags):
      if not bad:
        self.streak_start, self.streak = None, 0
        continue
      self.skipped += 1
      self.streak += 1
      self.streak_start = step if self.streak_start is None else self.streak_start
      if jax.process_index() == 0:
        print(f"Skipped the non-finite update of step {step} ({self.skipped} skipped so far).",
              flush=True)
      if self.streak >= self.rewind_after:
        first = self.streak_start
        self.streak_start, self.streak = None, 0
        if self.rewinds >= self.max_rewinds:
          raise NonFiniteError(
              f"non-finite loss or gradient norm at steps {first}-{step}, still after "
              f"{self.rewinds} rewind(s) (config.nonfinite.max_rewinds); training stopped; "
              f"{_where(self.checkpointer)}.")
        if self.checkpointer.finished_step() is None:
          raise NonFiniteError(
              f"non-finite loss or gradient norm at steps {first}-{step} and no checkpoint to "
              "rewind to; training stopped. Lower the learning rate or checkpoint earlier.")
        self.rewinds += 1
        raise Rewind(first, step)

  def may_checkpoint(self) -> bool:
    return self.streak == 0


def injected_steps() -> set[int]:
  text = os.environ.get(INJECT_ENV, "")
  return {int(s) for s in text.replace(",", " ").split()}


class Injector:
  """Poisons the listed steps' batches once each (see the module docstring)."""

  def __init__(self):
    self.pending = injected_steps()

  def __call__(self, step: int, batch: dict) -> dict:
    if step not in self.pending:
      return batch
    self.pending.discard(step)
    return dict(batch, loss_weight=np.full_like(batch["loss_weight"], np.nan))
