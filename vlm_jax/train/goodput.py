"""Goodput: where a run's wall time went, across restarts.

Every second of a run, from its first launch to now, falls in one category:

  startup     launch to the training loop: interpreter, imports, jax (and jax.distributed),
              the data pipeline, model and state shapes; the metric writers' set-up and the
              peak-FLOPs measurement (CPU)
  init        initialising a fresh train state (and importing pretrained weights)
  restore     restoring the newest checkpoint (on a restart or a rewind)
  compile     a process's first step: trace, compile (or a compilation-cache hit), run
  data        waiting for the next batch
  step        queueing steps and waiting for the device to finish them
  checkpoint  saving checkpoints (the blocking part, and waiting for asynchronous writes)
  eval        evaluations during training
  other       the rest: logging (metric writers, the data counters' sum over processes), the
              loop's own bookkeeping
  restart     from the previous process's last metric record to this process's launch: the
              end of the attempt it replaces (a hang until the watchdog fired, a crash, a
              preemption's checkpoint, the final checkpoint of a finished run that is now
              extended) and the launcher's or scheduler's restart (a queue included); in
              the `Time:` line a failing process prints, also the phase an exception ended
              (waiting on a peer that died)
  lost        data and step time of steps whose results were thrown away: those after the
              checkpoint a restart (or a non-finite rewind) resumed from, up to the last step
              the earlier attempt logged; taken out of `data` and `step`

goodput = step / wall. Times are measured on the host: with asynchronous dispatch, `data`
overlaps the device's work on queued steps, so it is the time the host spent getting batches
(when the data pipeline is the bottleneck the device waits for all of it; when the device
is, `step` grows and `data` shrinks). An attempt is a stretch of training from one state:
a process, or the part of one after a rewind. Each metrics.jsonl record carries the run's
totals and the attempt's own counters, so a restarted run reads what was lost from the
records of the attempts before it, and each record's Unix time tells the next process how
long the restart took. So the categories add up to the run's wall time: from the first
launch to the newest record, restarts included (process 0 writes the records; hosts' clocks
are assumed to agree to well under a second, as NTP keeps them). A record is written at each
logging step only (consumers expect one per step): the `Time:` line printed at the end also
counts the final checkpoint.
"""
import json
import time

import numpy as np

from vlm_jax import storage
from vlm_jax.train import phases

CATEGORIES = ("startup", "init", "restore", "compile", "data", "step", "checkpoint", "eval",
              "other", "restart", "lost")
# Loop phases (train/phases.py) counted under another category's name.
_PHASE_CATEGORY = {"dispatch": "step", "device": "step", "log": "other",
                   phases.INTERRUPTED: "restart"}
_ATTEMPT_KEYS = ("time/attempt", "time/resumed_from", "time/attempt_data_s",
                 "time/attempt_step_s", "time/unix")


class _Attempt:
  """A stretch of training from the state at step `resumed_from`; `points` are (step, data
  seconds, step seconds) since it began, at each logged step."""

  def __init__(self, number: int, resumed_from: int, points=()):
    self.number, self.resumed_from = number, resumed_from
    self.points = list(points)

  def last_step(self) -> int:
    return self.points[-1][0] if self.points else self.resumed_from

  def time_at(self, step: float) -> np.ndarray:
    """[data s, step s] spent reaching `step` (interpolated between logged steps)."""
    steps = [self.resumed_from] + [p[0] for p in self.points]
    return np.array([np.interp(step, steps, [0.0] + [p[i] for p in self.points])
                     for i in (1, 2)])


def redone_time(attempts, resume_step: int) -> np.ndarray:
  """[data s, step s] of the steps after `resume_step` that `attempts` (oldest first) had
  already done: thrown away when training resumes from the state of `resume_step`. Each
  attempt's own steps are those up to where the next one resumed (or its last logged step)."""
  lost, upper = np.zeros(2), None
  for attempt in reversed(attempts):
    top = attempt.last_step() if upper is None else min(upper, attempt.last_step())
    low = max(resume_step, attempt.resumed_from)
    if top > low:
      lost += attempt.time_at(top) - attempt.time_at(low)
    if resume_step >= attempt.resumed_from:
      break
    upper = attempt.resumed_from
  return lost


def read_history(metrics_path: str):
  """(attempts, the run's totals in the newest record, that record's Unix time or None) from
  an earlier metrics.jsonl."""
  attempts, totals, written = {}, {}, None
  if not storage.exists(metrics_path):
    return [], totals, written
  for line in storage.read_text(metrics_path).splitlines(keepends=True):
    if not line.endswith("\n"):
      break  # a line cut off by a crash
    record = json.loads(line)
    if not all(k in record for k in _ATTEMPT_KEYS):
      continue  # evaluation records, runs from before goodput accounting
    number = int(record["time/attempt"])
    attempt = attempts.setdefault(number, _Attempt(number, int(record["time/resumed_from"])))
    point = (record["step"], record["time/attempt_data_s"], record["time/attempt_step_s"])
    attempt.points.append(point)
    totals = {c: record.get(f"time/{c}_s", 0.0) for c in CATEGORIES}
    written = record["time/unix"]
  return [attempts[n] for n in sorted(attempts)], totals, written


class Goodput:
  """The run's time accounts: this process's phases plus the totals earlier processes
  recorded; `begin_attempt(step)` whenever training (re)starts from a state."""

  def __init__(self, clock, metrics_path: str):
    self.clock = clock
    self.attempts, self.carried, last_written = read_history(metrics_path)
    self.restart_s = max(0.0, clock.launch_time - last_written) if last_written else 0.0
    self.lost = np.zeros(2)  # [data s, step s] this process found lost
    self.current = None
    self._base = np.zeros(2)
    self.first_step_s = None

  def _phase_time(self) -> np.ndarray:
    totals = self.clock.totals
    return np.array([totals["data"], totals["dispatch"] + totals["device"]])

  def begin_attempt(self, resume_step: int) -> None:
    if self.current is not None:
      self.attempts.append(self.current)
    self.lost += redone_time(self.attempts, resume_step)
    number = self.attempts[-1].number + 1 if self.attempts else 1
    self.current = _Attempt(number, resume_step)
    self._base = self._phase_time()

  def first_step_done(self) -> str:
    """Marks the end of this process's first step: launch to here is its start-up latency;
    returns a line saying where it went."""
    if self.first_step_s is None:
      self.first_step_s = self.clock.elapsed()
    totals = self.clock.totals
    parts = [f"start-up {self.clock.startup() + totals['startup']:.1f} s"] + [
        f"{name} {totals[name]:.1f} s" for name in ("init", "restore", "compile", "data")
        if totals[name]]
    return f"Launch to first step: {self.first_step_s:.1f} s ({', '.join(parts)})"

  def totals(self) -> dict:
    """{category: seconds} for the whole run so far, and 'wall'."""
    clock = self.clock
    mine = {c: 0.0 for c in CATEGORIES}
    for phase, seconds in list(clock.totals.items()):
      mine[_PHASE_CATEGORY.get(phase, phase)] += seconds
    mine["startup"] += clock.startup()  # and the writers' and peak FLOPs' set-up
    mine["other"] = clock.elapsed() - sum(mine.values())
    mine["data"] -= self.lost[0]
    mine["step"] -= self.lost[1]
    mine["lost"] = float(self.lost.sum())
    mine["restart"] += self.restart_s
    run = {c: self.carried.get(c, 0.0) + mine[c] for c in CATEGORIES}
    run["wall"] = sum(run.values())
    return run

  def scalars(self, step: int) -> dict:
    """The run's totals and this attempt's counters for the metric record of `step`."""
    attempt_time = self._phase_time() - self._base
    point = (step, float(attempt_time[0]), float(attempt_time[1]))
    self.current.points.append(point)
    run = self.totals()
    scalars = {f"time/{c}_s": v for c, v in run.items()}
    scalars.update({"goodput": run["step"] / run["wall"] if run["wall"] > 0 else 0.0,
                    "time/attempt": self.current.number,
                    "time/resumed_from": self.current.resumed_from,
                    "time/attempt_data_s": point[1], "time/attempt_step_s": point[2],
                    "time/unix": time.time()})
    if self.first_step_s is not None:
      scalars["time/first_step_s"] = self.first_step_s
    return scalars


def summary(totals: dict) -> str:
  """`goodput 93% of 1h02m: step 58m01s, compile 1m10s, ...` (the largest categories first)."""
  wall = totals["wall"]
  parts = [f"{c} {_duration(totals[c])} ({100 * totals[c] / wall:.1f}%)"
           for c in sorted(CATEGORIES, key=lambda c: -totals[c]) if totals[c] > 0.005 * wall]
  return (f"goodput {100 * totals['step'] / wall:.1f}% of {_duration(wall)}: "
          + ", ".join(parts))


def _duration(seconds: float) -> str:
  if seconds < 60:
    return f"{seconds:.1f}s"
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
