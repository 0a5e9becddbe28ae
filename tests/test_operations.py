"""Operating a long run as a pod job runs it: `vlm-launch local --num-processes 2` with the
launcher's default flags, a profile of steps 3-4, and a stall injected into process 1 at step
8. Process 1's watchdog prints the stalled thread's stack and exits 76 within its bound; the
launcher restarts the job, which resumes from the step-5 checkpoint and finishes. Each process
wrote a trace the profiler loads; the goodput categories add up to the wall time measured
here, across the restart, and the lost time is the time the first attempt spent on the steps
the second one redid."""
import json
import os
import re
import subprocess
import sys
import time

import pytest
from jax.profiler import ProfileData

from test_train import TINY  # noqa: F401  (tests/ is on sys.path)
from vlm_jax.train import goodput, phases, profiling, watchdog

STEPS, STALL_STEP, MIN_S = 12, 8, 5.0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(workdir, launcher output, {event: Unix time the launcher printed it})."""
  workdir = tmp_path_factory.mktemp("ops") / "run"
  command = [sys.executable, "-m", "vlm_jax.cli.launch", "local", "--num-processes", "2",
             "--config", TINY, "--workdir", str(workdir), "--config.batch_size=8",
             f"--config.num_train_steps={STEPS}", "--config.log_every_steps=1",
             "--config.checkpoint.every_steps=5", "--config.optimizer.warmup_steps=2",
             "--num-samples=0", "--config.profile.steps=(3, 4)",
             "--config.watchdog.factor=5", f"--config.watchdog.min_s={MIN_S}"]
  env = {**os.environ, phases.INJECT_STALL_ENV: f"device@{STALL_STEP}@1"}
  proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env)
  lines, seen = [], {}
  try:
    for line in proc.stdout:  # timestamps as the launcher prints (it flushes every line)
      lines.append(line)
      for event, pattern in (("launched", "vlm-launch: process 0 pid"),
                             ("stalled", f"step {STALL_STEP - 1}/{STEPS} "),
                             ("failed", "failed with status")):
        if pattern in line and event not in seen:
          seen[event] = time.time()
    status = proc.wait(timeout=600)
  finally:
    proc.kill()
  out = "".join(lines)
  assert status == 0, out[-4000:]
  return workdir, out, seen


def test_the_stalled_process_reports_its_stack_and_exits_76_within_the_bound(run):
  workdir, out, seen = run
  # From process 0's step-7 line (process 1 logged step 7 too, then queued step 8 and began
  # to stall) to the launcher seeing the first process fail: the bound (5 x the median device
  # wait, at least MIN_S), one poll (MIN_S / 10), the report, with slack for a loaded
  # machine; far below the hour. Process 0, waiting for process 1 in a collective (step 8's
  # data counters, or step 9), fails as soon as process 1 is gone (its collective reports the
  # closed connection), or its own watchdog catches it first.
  assert 0 < seen["failed"] - seen["stalled"] < MIN_S + 15, seen
  assert f"process 1 exited with status {watchdog.EXIT_HUNG}" in out
  report_name, = [n for n in os.listdir(workdir / "hangs") if n.startswith("process_1_")]
  report = (workdir / "hangs" / report_name).read_text()
  waited = float(re.search(r"no progress for ([\d.]+) s in phase 'device' at step 8", report)[1])
  assert MIN_S <= waited < MIN_S + 3, report[:500]  # printed to 0.1 s
  assert "host " in report and "process 1 of 2" in report
  # The stalled (main) thread's stack comes first, down to the injected sleep in the loop.
  main = report[report.index("Thread MainThread"):]
  main = main[:main.index("\nThread ")]
  assert "in _train" in main and "in _stall_for_test" in main and "time.sleep(3600)" in main
  assert "Thread vlm_jax_watchdog" in report
  for name in os.listdir(workdir / "hangs"):  # process 0's, if its watchdog fired first
    if name.startswith("process_0_"):
      text = (workdir / "hangs" / name).read_text()
      assert "in phase 'log' at step 8" in text or "in phase 'device' at step 9" in text
  assert out.count("restarting it (restart 1 of at most 3)") == 1
  assert "Resuming from checkpoint step 5 in" in out


def test_each_process_wrote_a_trace_of_the_profiled_steps_that_the_profiler_loads(run):
  workdir, out, _ = run
  traces = profiling.traces(str(workdir))
  assert [p.split(os.sep)[-5] for p in traces] == ["process_0", "process_1"], traces
  for path in traces:
    plane = ProfileData.from_file(path).find_plane_with_name("/host:CPU")
    events = [e for line in plane.lines for e in line.events]
    assert sorted(dict(e.stats)["step_num"] for e in events if e.name == "train") == [3, 4]
  assert "Profiled up to step 4" in out


def _records(workdir):
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def _progress(record):
  return record["time/attempt_data_s"] + record["time/attempt_step_s"]


def test_the_time_accounts_add_up_to_the_wall_time_and_lost_is_the_redone_steps(run):
  workdir, out, seen = run
  records = _records(workdir)
  final = records[-1]
  categories = {c: final[f"time/{c}_s"] for c in goodput.CATEGORIES}
  assert sum(categories.values()) == pytest.approx(final["time/wall_s"], rel=1e-9)
  assert min(categories.values()) >= 0, categories
  # The wall time measured here: process 0's first launch to the last record's write.
  measured = os.path.getmtime(workdir / "metrics.jsonl") - seen["launched"]
  assert final["time/wall_s"] == pytest.approx(measured, rel=0.02), (final, measured)
  # The hang (until the watchdog fired) and the relaunch are the restart's time.
  assert categories["restart"] > MIN_S
  first = [r for r in records if r.get("time/attempt") == 1]
  second = [r for r in records if r.get("time/attempt") == 2]
  assert {r["time/resumed_from"] for r in second} == {5}
  killed_after = first[-1]["step"]
  assert killed_after >= STALL_STEP - 1
  by_step = {r["step"]: _progress(r) for r in first}
  assert sorted(by_step) == list(range(1, killed_after + 1))
  redone = sum(by_step[s] - by_step[s - 1] for s in range(6, killed_after + 1))
  assert final["time/lost_s"] == pytest.approx(redone, rel=1e-6)
  assert final["time/lost_s"] > 0
  assert final["goodput"] == pytest.approx(categories["step"] / final["time/wall_s"])
  last_line = next(line for line in out.splitlines() if line.startswith(f"step {STEPS}/"))
  assert last_line.endswith(f"goodput {100 * final['goodput']:.0f}%")
  assert "Time: goodput " in out  # the whole run's, printed at the end
