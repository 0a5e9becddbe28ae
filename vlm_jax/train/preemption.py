"""Preemption: on a notice, finish the current step, checkpoint it, and stop (vlm-train exit 75).

Two sources of notices, never both in one process:
- Multi-process runs (`jax.distributed` initialised): jax's preemption sync manager listens for
  SIGTERM and, on Cloud TPU, the maintenance/preemption notice, and agrees on one step at
  which every process saves; orbax exposes it as `CheckpointManager.reached_preemption(step)`.
  It must be asked at every step by every process, which the loop does.
- A single process without `jax.distributed`: a SIGTERM (or SIGINT) handler sets a flag that
  the loop reads after each step. The flag is a Python attribute, so checking it costs no
  device synchronisation. A second signal restores the default action, so it kills at once.

Rerunning the same `vlm-train` command resumes from the checkpoint (Trainer.initial_state), so
a launcher restarts a job that exited with cli/train.py's EXIT_PREEMPTED unchanged.
"""
import signal
import threading

import jax


class Preempted(Exception):
  """Training stopped for a preemption notice after `step`; `saved_step` is on disk."""

  def __init__(self, step: int, saved_step, source: str, directory: str):
    self.step, self.saved_step, self.source = step, saved_step, source
    kept = (f"checkpoint step {saved_step} is in {directory}" if saved_step is not None
            else "no checkpoint was written")
    super().__init__(f"preempted ({source}) after step {step}; {kept}; rerun the same command "
                     "to resume.")


class PreemptionWatch:
  """`notice(step, manager)` -> the notice's name once every process should stop, else None."""

  SIGNALS = (signal.SIGTERM,)  # not SIGINT: Ctrl-C means stop, not "restart me"

  def __init__(self):
    self._received = None
    self._previous = {}
    self.uses_jax_service = jax.distributed.is_initialized()
    # signal.signal only works in the main thread; elsewhere (notebooks' worker threads,
    # tests driving the loop from a thread) the default signal behaviour is left alone.
    if not self.uses_jax_service and threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._on_signal)

  def _on_signal(self, signum, frame):
    del frame
    self._received = signal.Signals(signum).name
    signal.signal(signum, signal.SIG_DFL)  # a second signal is not caught: it kills

  def notice(self, step: int, manager) -> str | None:
    if self.uses_jax_service:
      return "preemption notice" if manager.reached_preemption(step) else None
    return self._received

  def close(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
