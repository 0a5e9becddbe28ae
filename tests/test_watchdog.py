"""Hang detection's parts: the bound a phase gets, the report, the test hook's stall and the
exit status. tests/test_operations.py injects a stall into a 2-process run and checks what the
watchdog prints, its exit status, the time it took and the launcher's restart."""
import time
import types

import pytest

from vlm_jax.cli import train as train_cli
from vlm_jax.launch import slurm
from vlm_jax.train import phases, watchdog


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
  dog = watchdog.Watchdog(_clock_with({}), config)
  assert dog._thread is None  # pylint: disable=protected-access


def test_the_hang_status_is_the_same_everywhere():
  assert train_cli.EXIT_HUNG == watchdog.EXIT_HUNG == slurm.EXIT_HUNG == 76
  assert len({train_cli.EXIT_HUNG, train_cli.EXIT_PREEMPTED, train_cli.EXIT_WORKDIR,
              train_cli.EXIT_NONFINITE, train_cli.EXIT_CONFIG}) == 5


@pytest.mark.parametrize("spec, process, stalls_at", [
    ("device@8", 1, ("device", 8)), ("device@8@1", 1, ("device", 8)), ("device@8@1", 0, None),
    ("", 0, None)])
def test_the_stall_hook_names_a_phase_a_step_and_optionally_a_process(
    monkeypatch, spec, process, stalls_at):
  monkeypatch.setenv(phases.INJECT_STALL_ENV, spec)
  clock = phases.PhaseClock(process_index=process)
  assert clock._stall == stalls_at  # pylint: disable=protected-access
  clock.disarm_stall()  # a resumed run
  assert clock._stall is None  # pylint: disable=protected-access


def test_a_bad_stall_hook_is_named():
  with pytest.raises(ValueError, match="VLM_JAX_INJECT_STALL='device8'"):
    phases._parse_stall("device8", 0)  # pylint: disable=protected-access
