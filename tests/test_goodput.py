"""Goodput accounting: the categories add up to the wall time of a run that was killed and
restarted, and the time lost is the time of the steps the restart had to redo."""
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from test_train import _train_command  # noqa: F401  (tests/ is on sys.path)
from vlm_jax.train import goodput

STEPS = 20


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _progress(record):
  return record["time/attempt_data_s"] + record["time/attempt_step_s"]


def test_time_adds_up_across_a_kill_and_the_lost_time_is_the_redone_steps(tmp_path):
  workdir = tmp_path / "run"
  first_start = time.time()
  with open(tmp_path / "first.log", "w") as log:
    proc = subprocess.Popen(_train_command(workdir, STEPS), stdout=log, stderr=subprocess.STDOUT)
    try:
      deadline = time.time() + 300
      while not _logged_beyond(workdir, 13):
        assert proc.poll() is None and time.time() < deadline, "the run ended or stalled"
        time.sleep(0.01)
      proc.send_signal(signal.SIGKILL)
      killed = time.time()
      proc.wait(timeout=30)
    finally:
      proc.kill()
  first = _records(workdir)
  killed_after = first[-1]["step"]
  assert killed_after < STEPS, "killed too late: the run had finished"

  second_start = time.time()
  resumed = subprocess.run(_train_command(workdir, STEPS), capture_output=True, text=True,
                           timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  ended = os.path.getmtime(workdir / "metrics.jsonl")  # the final record's write
  resume_step = int(resumed.stdout.split("Resuming from checkpoint step ")[1].split()[0])
  assert resume_step < killed_after

  records = _records(workdir)
  final = records[-1]
  categories = {c: final[f"time/{c}_s"] for c in goodput.CATEGORIES}
  # The categories partition the run's wall time, and that is the wall time measured here:
  # from each launch to the kill, and to the last record.
  assert sum(categories.values()) == pytest.approx(final["time/wall_s"], rel=1e-9)
  measured = (killed - first_start) + (ended - second_start)
  assert final["time/wall_s"] == pytest.approx(measured, rel=0.02), (final, measured)
  assert min(categories.values()) >= 0, categories
  assert final["goodput"] == pytest.approx(categories["step"] / final["time/wall_s"])

  # Lost: the data and step time attempt 1 spent on steps resume_step+1 .. killed_after,
  # step by step from its own records (metrics every step).
  by_step = {r["step"]: _progress(r) for r in first if r.get("time/attempt") == 1}
  assert sorted(by_step) == list(range(1, killed_after + 1))
  redone = sum(by_step[s] - by_step[s - 1] for s in range(resume_step + 1, killed_after + 1))
  assert final["time/lost_s"] == pytest.approx(redone, rel=1e-6)
  assert final["time/lost_s"] > 0
  # ... about what attempt 2 took to redo them (its first step, the compile, excluded).
  second = {r["step"]: _progress(r) for r in records[len(first):]}
  assert {r["time/attempt"] for r in records[len(first):]} == {2}
  assert {r["time/resumed_from"] for r in records[len(first):]} == {resume_step}
  per_step_again = (second[killed_after] - second[resume_step + 1]) / \
      (killed_after - resume_step - 1)
  assert 0.2 < (redone / (killed_after - resume_step)) / per_step_again < 5
  # Attempt 2's own time went to its categories on top of attempt 1's, which it carried over.
  last_of_first = first[-1]
  assert categories["startup"] > last_of_first["time/startup_s"]
  assert categories["restore"] > 0 == last_of_first["time/restore_s"]
  assert f"goodput {100 * final['goodput']:.1f}% of" in resumed.stdout


def _logged_beyond(workdir, step) -> bool:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return False
  lines = [line for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]
  return bool(lines) and json.loads(lines[-1])["step"] >= step


def _attempt(number, resumed_from, points):
  return goodput._Attempt(number, resumed_from, points)  # pylint: disable=protected-access


def test_redone_time_follows_the_attempts_back_to_the_resumed_checkpoint():
  # Attempt 1 logged steps 1-13 (1 s of step time each, 0.1 s of data); attempt 2 resumed
  # from 10 and reached 12 (2 s each); now training resumes from 10 again.
  one = _attempt(1, 0, [(s, 0.1 * s, 1.0 * s) for s in range(1, 14)])
  two = _attempt(2, 10, [(s, 0.2 * (s - 10), 2.0 * (s - 10)) for s in range(11, 13)])
  np.testing.assert_allclose(goodput.redone_time([one, two], 10), [0.4, 4.0])  # 11, 12 of 2
  # From 5: attempt 2's steps 11-12 and attempt 1's 6-10 (its 11-13 were lost before).
  np.testing.assert_allclose(goodput.redone_time([one, two], 5), [0.4 + 0.5, 4.0 + 5.0])
  # Logged every 4 steps: steps between records are interpolated.
  sparse = _attempt(1, 0, [(4, 0.0, 4.0), (8, 0.0, 8.0), (12, 0.0, 12.0)])
  np.testing.assert_allclose(goodput.redone_time([sparse], 10), [0.0, 2.0])
  assert goodput.redone_time([], 0).sum() == 0


def test_a_fresh_run_carries_nothing_and_reads_no_lost_time(tmp_path):
  clock = goodput_clock()
  accounts = goodput.Goodput(clock, str(tmp_path / "metrics.jsonl"))
  accounts.begin_attempt(0)
  with clock.phase("data", 1):
    time.sleep(0.01)
  scalars = accounts.scalars(1)
  assert scalars["time/attempt"] == 1 and scalars["time/lost_s"] == 0
  assert scalars["time/data_s"] >= 0.01
  total = sum(scalars[f"time/{c}_s"] for c in goodput.CATEGORIES)
  assert total == pytest.approx(scalars["time/wall_s"])


def goodput_clock():
  from vlm_jax.train import phases  # pylint: disable=g-import-not-at-top
  return phases.PhaseClock(launch_time=time.time() - 1.0)
