"""SIGTERM -> the current step finishes, a checkpoint is saved, exit 75; rerunning resumes."""
import os
import signal

import reliability_runs as runs


def test_sigterm_saves_exits_75_and_the_rerun_continues_with_identical_losses(reference,
                                                                               tmp_path):
  ref_dir, ref_losses = reference
  workdir = tmp_path / "run"
  proc = runs.start(workdir, tmp_path / "first.log")
  try:
    runs.wait_until(lambda: runs.last_logged_step(workdir) >= 6, proc, "step 6 was logged")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
  finally:
    proc.kill()
  first = (tmp_path / "first.log").read_text()
  assert proc.returncode == 75, first[-3000:]
  stopped = runs.last_logged_step(workdir)
  assert 6 <= stopped < runs.STEPS, "the signal arrived too late to test anything"
  assert (f"vlm-train: error: preempted (SIGTERM) after step {stopped}; checkpoint step "
          f"{stopped} is in {workdir / 'checkpoints'}; rerun the same command to resume.") in first
  assert os.path.isdir(workdir / "checkpoints" / str(stopped))

  resumed = runs.run(workdir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resuming from checkpoint step {stopped} in" in resumed.stdout
  runs.assert_same_losses(workdir, ref_losses, range(1, runs.STEPS + 1))
