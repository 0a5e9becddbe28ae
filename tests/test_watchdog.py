"""Hang detection: an injected stall is caught within the configured bound, the stalled
thread's stack is printed, and vlm-train exits with its hang status."""
import os
import subprocess
import sys
import time
import types

import pytest

from test_train import _train_command, read_losses  # noqa: F401  (tests/ is on sys.path)
from vlm_jax.cli import train as train_cli
from vlm_jax.launch import slurm
from vlm_jax.train import phases, watchdog

MIN_S = 5.0  # the bound the stall must exceed (5 x the median step is far less)


def test_an_injected_stall_prints_the_stalled_stack_and_exits_76_within_the_bound(tmp_path):
  command = _train_command(tmp_path, 20) + [
      "--config.watchdog.factor=5", f"--config.watchdog.min_s={MIN_S}",
      "--config.watchdog.timeout_s=600"]
  env = {**os.environ, phases.INJECT_STALL_ENV: "device@8"}
  with open(tmp_path / "run.log", "w") as log:
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
      deadline = time.time() + 300
      while 7 not in _logged(tmp_path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
      step_7_logged = time.time()  # step 8's device wait (the stall) starts right after
      status = proc.wait(timeout=120)
    finally:
      proc.kill()
  waited = time.time() - step_7_logged
  out = (tmp_path / "run.log").read_text()
  assert status == watchdog.EXIT_HUNG == 76, out[-3000:]
  assert max(_logged(tmp_path)) == 7
  # The bound plus one poll (MIN_S / 10) and the time to write the report, with slack for a
  # loaded machine; far below the stall's hour.
  assert MIN_S < waited < MIN_S + 15, waited
  assert "watchdog: no progress for" in out and "in phase 'device' at step 8" in out
  assert f"at least config.watchdog.min_s={MIN_S:g}" in out
  # The stalled (main) thread's stack, down to the injected sleep inside the loop's phase.
  main = out[out.index("Thread MainThread"):]
  main = main[:main.find("\nThread ", 1) if "\nThread " in main[1:] else len(main)]
  assert "in _train" in main and "in _stall_for_test" in main and "time.sleep(3600)" in main
  assert "Thread vlm_jax_watchdog" in out
  report, = os.listdir(tmp_path / "hangs")
  assert "in _stall_for_test" in (tmp_path / "hangs" / report).read_text()


def _logged(workdir):
  return read_losses(workdir) if os.path.exists(workdir / "metrics.jsonl") else {}


def _clock_with(recent: dict, current=None):
  clock = phases.PhaseClock(launch_time=time.time())
  for name, durations in recent.items():
    for d in durations:
      clock._recent[name].append(d)  # pylint: disable=protected-access
  clock.current = current
  return clock


def test_the_bound_is_the_median_multiple_then_the_floor_then_the_absolute_bound():
  config = types.SimpleNamespace(factor=10.0, min_s=3.0, timeout_s=100.0)
  dog = watchdog.Watchdog(_clock_with({"device": [0.5, 0.9, 1.0, 1.1, 50.0],
                                       "data": [1.0, 1.0]}), config)
  try:
    assert dog.bound("device")[0] == pytest.approx(10.0)  # 10 x median 1.0
    assert dog.bound("device", units=4)[0] == pytest.approx(40.0)  # per step, 4 steps queued
    assert dog.bound("device", units=20)[0] == 100.0  # capped by timeout_s
    assert dog.bound("data")[0] == 100.0  # too little history: the absolute bound
    assert dog.bound("eval")[0] == 100.0
    assert dog.bound("eval")[0] == 100.0
  finally:
    dog.stop()
  quick = watchdog.Watchdog(_clock_with({"data": [0.01] * 3}), config)
  try:
    assert quick.bound("data")[0] == 3.0  # the floor, not 0.1 s
  finally:
    quick.stop()


def test_a_phase_past_its_bound_is_reported_and_one_within_is_not():
  config = types.SimpleNamespace(factor=10.0, min_s=3.0, timeout_s=100.0)
  now = time.monotonic()
  stuck = phases.Phase("checkpoint", 40, now - 120, 1)
  dog = watchdog.Watchdog(_clock_with({}, stuck), config)
  try:
    report = dog.check(now)
    assert "no progress for 120.0 s in phase 'checkpoint' at step 40" in report
    assert "config.watchdog.timeout_s=100" in report and "status 76" in report
    assert dog.check(now - 30) is None
  finally:
    dog.stop()


def test_no_thread_when_every_bound_is_off():
  config = types.SimpleNamespace(factor=0.0, min_s=0.0, timeout_s=0.0)
  assert watchdog.Watchdog(_clock_with({}), config)._thread is None  # pylint: disable=protected-access


def test_the_hang_status_is_the_same_everywhere():
  assert train_cli.EXIT_HUNG == watchdog.EXIT_HUNG == slurm.EXIT_HUNG == 76
  assert len({train_cli.EXIT_HUNG, train_cli.EXIT_PREEMPTED, train_cli.EXIT_WORKDIR,
              train_cli.EXIT_NONFINITE, train_cli.EXIT_CONFIG}) == 5


def test_vlm_launch_local_restarts_a_hung_run_which_resumes_from_its_checkpoint(tmp_path):
  # The stall is injected into every run, so the run restarted from step 5 hangs again at
  # step 9 (3 device waits later: enough history for the relative bound) and the launcher
  # gives up after --max-hang-restarts, with vlm-train's hang status.
  command = [sys.executable, "-m", "vlm_jax.cli.launch", "local", "--max-hang-restarts", "1",
             *_train_command(tmp_path, 12)[3:], "--config.checkpoint.async_save=False",
             "--config.watchdog.factor=5", f"--config.watchdog.min_s={MIN_S}",
             "--config.watchdog.timeout_s=600"]
  env = {**os.environ, phases.INJECT_STALL_ENV: "device@9"}
  result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
  out = result.stdout + result.stderr
  assert result.returncode == watchdog.EXIT_HUNG, out[-3000:]
  assert out.count("watchdog: no progress for") == 2
  assert out.count("restarting it (restart 1 of at most 1)") == 1
  assert "Resuming from checkpoint step 5 in" in out
  assert len(os.listdir(tmp_path / "hangs")) == 2
