"""Skipping and counting bad input records inside a grain pipeline.

A preprocessing step that meets an unusable record returns a `Skipped` marker instead of
raising, so one corrupt JPEG in a billion does not stop a pod. `SkipBadRecords` drops the
markers, warns (rate-limited) with the shard and key, and raises `TooManyBadRecords` naming
the source when more than `max_fraction` of its last `window` records were bad: a wholly
broken shard or a wrong format is an error, not noise. The number skipped travels with the
next good example (`SKIPPED_KEY`), because the dropping happens in grain's worker
processes and their Python counters are invisible to the trainer; `CountSkipped` removes
the key from each batch and accumulates totals the trainer can log, and likewise counts the
examples of each mixture task (`TASK_KEY`, set by the pipeline).
"""
import collections
import dataclasses
import logging
import time

import grain
import numpy as np

SKIPPED_KEY = "_skipped_records"
TASK_KEY = "_task"  # the example's task, numbered in the mixture's order
# A packed row (packing.py) holds several examples: its TASK_KEY is [T], the task number + 1
# on each example's first token and 0 elsewhere, so a batch's TASK_KEY is [B] or [B, T].


@dataclasses.dataclass(frozen=True)
class Skipped:
  source: str
  key: str
  reason: str


class TooManyBadRecords(RuntimeError):
  pass


class BadRecordMonitor:
  """Counts bad records per source, warns at most every `warn_every_s`, enforces the limit."""

  def __init__(self, window=1000, max_fraction=0.1, warn_every_s=10.0):
    self._window, self._max_fraction, self._warn_every_s = window, max_fraction, warn_every_s
    self._recent = collections.defaultdict(lambda: collections.deque(maxlen=window))
    self._last_warning, self._unwarned = -float("inf"), 0
    self.skipped = collections.Counter()  # by reason, before the first ':'
    self.good = 0

  def bad(self, marker: Skipped):
    self.skipped[marker.reason.split(":")[0]] += 1
    self._unwarned += 1
    now = time.monotonic()
    if now - self._last_warning >= self._warn_every_s:
      logging.warning("skipped bad record %s in %s: %s (%d skipped since last warning)",
                      marker.key, marker.source, marker.reason, self._unwarned)
      self._last_warning, self._unwarned = now, 0
    self._record(marker.source, True)

  def ok(self, source: str):
    self.good += 1
    self._record(source, False)

  def _record(self, source, bad):
    recent = self._recent[source]
    recent.append(bad)
    # Judge only a full window (or a small source read to its end: see `finish`), so a bad
    # record early in a shard is not mistaken for a broken shard.
    if bad and len(recent) == self._window:
      self._check(source, recent)

  def _check(self, source, recent):
    if sum(recent) > self._max_fraction * len(recent):
      raise TooManyBadRecords(
          f"{source}: {sum(recent)} of the last {len(recent)} records were bad "
          f"(limit {self._max_fraction:.0%}, config data.max_bad_fraction); is the format "
          "or path right?")

  def finish(self):
    """Checks partial windows too (call when a finite pass over the data ends)."""
    for source, recent in self._recent.items():
      self._check(source, recent)


class _SkipBadRecordsIterator(grain.DatasetIterator):

  def __init__(self, parent, window, max_fraction, warn_every_s):
    super().__init__(parent)
    self._monitor = BadRecordMonitor(window, max_fraction, warn_every_s)
    self._pending = 0

  def __next__(self):
    while True:
      element = next(self._parent)
      if isinstance(element, Skipped):
        self._pending += 1
        self._monitor.bad(element)
        continue
      self._monitor.ok(element.pop("_source", ""))
      element[SKIPPED_KEY] = np.int32(self._pending)
      self._pending = 0
      return element

  def get_state(self):
    return {"parent": self._parent.get_state(), "pending": self._pending}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._pending = state["pending"]


class SkipBadRecords(grain.IterDataset):

  def __init__(self, parent, window=1000, max_fraction=0.1, warn_every_s=10.0):
    super().__init__(parent)
    self._args = (window, max_fraction, warn_every_s)

  def __iter__(self):
    return _SkipBadRecordsIterator(self._parent.__iter__(), *self._args)


class _CountSkippedIterator(grain.DatasetIterator):

  def __init__(self, parent, tasks):
    super().__init__(parent)
    self._tasks = [f"examples/{name}" for name in tasks]
    self.counters = {"examples": 0, "skipped_records": 0, **dict.fromkeys(self._tasks, 0)}

  def __next__(self):
    batch = next(self._parent)
    skipped = batch.pop(SKIPPED_KEY)
    self.counters["skipped_records"] += int(np.sum(skipped))
    if TASK_KEY not in batch:
      self.counters["examples"] += len(skipped)
      return batch
    tasks = np.asarray(batch.pop(TASK_KEY))
    if tasks.ndim == 2:  # packed rows
      tasks = tasks[tasks > 0] - 1
    self.counters["examples"] += tasks.size
    counts = np.bincount(tasks, minlength=len(self._tasks))
    for key, count in zip(self._tasks, counts):
      self.counters[key] += int(count)
    return batch

  def get_state(self):
    return {"parent": self._parent.get_state(), "counters": dict(self.counters)}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self.counters = {**dict.fromkeys(self._tasks, 0), **state["counters"]}


class CountSkipped(grain.IterDataset):
  """Totals of examples, skipped records and examples per task (named `tasks`)."""

  def __init__(self, parent, tasks=()):
    super().__init__(parent)
    self._task_names = tuple(tasks)

  def __iter__(self):
    return _CountSkippedIterator(self._parent.__iter__(), self._task_names)
