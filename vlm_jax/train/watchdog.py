"""Hang detection: a thread that ends a training process whose loop stopped making progress.

It watches the loop's phases (train/phases.py). A phase is hung when it has lasted longer
than `config.watchdog.factor` times the median of its kind's recent durations (per step, for
a wait that covers several queued steps) and longer than `min_s`, or longer than
`timeout_s` whatever its history (the first compile, the first checkpoint, an evaluation).
Time outside any phase (the loop's bookkeeping) has the `timeout_s` bound. Then the
watchdog prints what hung (phase, step, host, process, the bound) and every thread's Python
stack to stderr and to <workdir>/hangs/process_<i>_<time>.txt (given up on after
REPORT_WRITE_S: the hang may be the storage's), and exits the process with EXIT_HUNG without
any clean-up (the main thread is stuck; a clean exit would wait for it). The launcher
restarts the run, which resumes from its newest checkpoint (docs/reliability.md,
docs/launch.md); the report files tell it a hang happened even when its status is another
process's (srun reports the highest status of a job's tasks).

A hung collective (another host died or stalled) shows as a long `device` phase: the host
waits for the step's results. Data, checkpoint and evaluation hangs show as their phases.
"""
import os
import socket
import statistics
import sys
import threading
import time
import traceback

from vlm_jax import storage

# vlm-train's exit status after a hang (cli/train.py and launch/ repeat it; a test checks).
EXIT_HUNG = 76
MIN_HISTORY = 3  # phases of a kind seen before the relative bound applies
REPORT_WRITE_S = 10.0
HANG_REPORTS = "hangs"  # the directory in the workdir
_WAITING_FOR = {
    "data": "the next batch from the data pipeline",
    "compile": "the first step's compilation and run",
    "dispatch": "jax to queue the step",
    "device": "the device to finish the queued steps (a hung collective waits here: another "
              "process stopped or is slow)",
    "checkpoint": "a checkpoint save (storage, or the processes' save barrier)",
    "eval": "an evaluation",
    "init": "the train state's initialisation",
    "restore": "a checkpoint restore",
    "startup": "the metric writers' set-up and the peak FLOPs measurement",
    "log": "the metrics of a logging step: the processes' data counters (a collective: "
           "another process stopped or is slow), the metric writers",
    None: "the loop between phases",
}


class Watchdog:
  """Starts a daemon thread watching `clock`; `stop()` ends it. No thread when every bound
  in `watchdog_config` is 0."""

  def __init__(self, clock, watchdog_config, report_dir: str | None = None,
               process_index: int = 0, process_count: int = 1,
               exit_fn=os._exit):  # pylint: disable=protected-access
    self.clock, self.config, self.report_dir = clock, watchdog_config, report_dir
    self.process_index = process_index
    self.where = f"host {socket.gethostname()}, process {process_index} of {process_count}"
    self._exit = exit_fn
    self._stopped = threading.Event()
    self._thread = None
    if self.config.timeout_s > 0 or self.config.factor > 0:
      self._thread = threading.Thread(target=self._watch, name="vlm_jax_watchdog", daemon=True)
      self._thread.start()

  def bound(self, name, units: int = 1) -> tuple[float, str]:
    """(seconds a phase `name` covering `units` steps may take, how that was decided)."""
    c = self.config
    limit = c.timeout_s if c.timeout_s > 0 else float("inf")
    why = f"the absolute bound config.watchdog.timeout_s={c.timeout_s:g}"
    recent = self.clock.recent(name) if name else []
    if c.factor > 0 and len(recent) >= MIN_HISTORY:
      median = statistics.median(recent)
      relative = max(c.min_s, c.factor * median * units)
      if relative < limit:
        limit = relative
        why = (f"config.watchdog.factor={c.factor:g} x the median {median:.3g} s of the last "
               f"{len(recent)} '{name}' phases" + (f" x {units} steps" if units > 1 else "") +
               f", at least config.watchdog.min_s={c.min_s:g}")
    return limit, why

  def check(self, now: float | None = None) -> str | None:
    """The report of a hang if the loop is hung now, else None."""
    now = time.monotonic() if now is None else now
    phase = self.clock.current
    name, start = (phase.name, phase.start) if phase else (None, self.clock.idle_since)
    limit, why = self.bound(name, phase.units if phase else 1)
    elapsed = now - start
    if elapsed <= limit:
      return None
    what = f"phase '{name}'" + (f" at step {phase.step}" if phase and phase.step else "") \
        if phase else "no phase"
    return (f"vlm-train: watchdog: no progress for {elapsed:.1f} s in {what}, waiting for "
            f"{_WAITING_FOR.get(name, name)}; {self.where}. The bound is {limit:.3g} s "
            f"({why}). Python stacks of every thread follow; exiting with status {EXIT_HUNG} "
            "so the launcher restarts the run from its newest checkpoint.")

  def _watch(self):
    while not self._stopped.wait(self._poll_s()):
      report = self.check()
      if report and not self._stopped.is_set():
        text = report + "\n" + thread_stacks()
        sys.stderr.write(text)
        sys.stderr.flush()
        sys.stdout.flush()
        self._save(text)
        self._exit(EXIT_HUNG)
        return

  def _save(self, text: str):
    """Writes the report file from another thread, waiting at most REPORT_WRITE_S for it."""
    if not self.report_dir:
      return
    path = storage.join(self.report_dir, f"process_{self.process_index}_{int(time.time())}.txt")

    def write():
      try:
        storage.write_atomic(path, text)
      except OSError as e:
        sys.stderr.write(f"vlm-train: watchdog: could not write {path}: {e}\n")

    writer = threading.Thread(target=write, name="vlm_jax_hang_report", daemon=True)
    writer.start()
    writer.join(REPORT_WRITE_S)

  def _poll_s(self) -> float:
    """Often enough to act within a small fraction of the tightest bound."""
    bounds = [b for b in (self.config.min_s, self.config.timeout_s) if b > 0]
    return min([10.0] + [b / 10 for b in bounds])

  def stop(self):
    self._stopped.set()
    if self._thread is not None:
      self._thread.join(timeout=5)


def thread_stacks() -> str:
  """Every thread's Python stack, the main thread's (the loop's) first, innermost call last
  (as tracebacks read)."""
  names = {t.ident: t.name for t in threading.enumerate()}
  main = threading.main_thread().ident
  frames = sys._current_frames()  # pylint: disable=protected-access
  parts = []
  for ident, frame in sorted(frames.items(), key=lambda item: item[0] != main):
    parts.append(f"Thread {names.get(ident, '?')} ({ident}), most recent call last:\n" +
                 "".join(traceback.format_stack(frame)))
  return "\n".join(parts)
