"""Goodput accounting's parts: the time lost to redone steps, followed back through attempts;
the categories of a fresh run; a restart's time. tests/test_operations.py checks a whole
2-process run that hangs and restarts against the wall time measured outside it."""
import json
import time

import numpy as np
import pytest

from vlm_jax import storage
from vlm_jax.train import goodput, phases


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
  return phases.PhaseClock(launch_time=time.time() - 1.0)


@pytest.mark.parametrize("workdir", ["tmp_path", "gcs_dir"])
def test_a_restart_counts_the_gap_since_the_last_record_and_the_phase_a_failure_ended(
    request, workdir):
  metrics_path = storage.join(str(request.getfixturevalue(workdir)), "metrics.jsonl")
  # The previous process logged step 3 ten seconds ago; this one was launched 4 s ago.
  now = time.time()
  clock = phases.PhaseClock(launch_time=now - 4.0)
  history = {"step": 3, "time/attempt": 1, "time/resumed_from": 0, "time/attempt_data_s": 0.3,
             "time/attempt_step_s": 3.0, "time/unix": now - 10.0,
             **{f"time/{c}_s": 1.0 for c in goodput.CATEGORIES}}
  storage.write_atomic(metrics_path, json.dumps(history) + "\n")
  accounts = goodput.Goodput(clock, metrics_path)
  accounts.begin_attempt(2)  # resumed from step 2: step 3 is redone
  with pytest.raises(RuntimeError):
    with clock.phase("device", 3):
      time.sleep(0.05)
      raise RuntimeError("a peer died in the collective")
  interrupted = clock.totals[phases.INTERRUPTED]
  assert interrupted >= 0.05
  run = accounts.totals()
  assert run["restart"] == pytest.approx(1.0 + 6.0 + interrupted, abs=0.01)
  assert run["step"] == pytest.approx(1.0 - 1.0)  # the earlier 1 s, less step 3's redone 1 s
  assert run["lost"] == pytest.approx(1.0 + 1.0 + 0.1)  # and its 0.1 s of data
  # The earlier processes' 11 s, the 6 s between them and this one, this one's own time.
  assert run["wall"] == pytest.approx(11.0 + 6.0 + clock.elapsed(), abs=0.01)
  assert clock.recent("device") == []  # a failed phase is no measure of the next one
