"""SIGTERM -> the current step finishes, a checkpoint is saved, exit 75; rerunning resumes."""
import os
import signal
import subprocess
import sys

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


# With jax.distributed initialised, the notice goes through jax's preemption sync manager
# (SIGTERM here; the Cloud TPU maintenance event on TPU VMs) and orbax's reached_preemption,
# which is how multi-process jobs agree on the step to save.
_DISTRIBUTED_MAIN = """
import sys, jax, portpicker
jax.distributed.initialize(f"localhost:{portpicker.pick_unused_port()}", num_processes=1,
                           process_id=0)
from vlm_jax.cli import train
train.main(sys.argv[1:])
"""


def test_a_notice_through_jax_preemption_sync_saves_and_exits_75(tmp_path):
  workdir = tmp_path / "run"
  argv = runs.command(workdir)[3:]  # drop `python -m vlm_jax.cli.train`
  with open(tmp_path / "run.log", "w") as log:
    proc = subprocess.Popen([sys.executable, "-c", _DISTRIBUTED_MAIN] + argv, stdout=log,
                            stderr=subprocess.STDOUT)
  try:
    runs.wait_until(lambda: runs.last_logged_step(workdir) >= 1, proc, "step 1 was logged")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
  finally:
    proc.kill()
  out = (tmp_path / "run.log").read_text()
  assert proc.returncode == 75, out[-3000:]
  stopped = runs.last_logged_step(workdir)
  assert stopped < runs.STEPS
  assert (f"vlm-train: error: preempted (preemption notice) after step {stopped}; checkpoint "
          f"step {stopped} is in {workdir / 'checkpoints'}") in out
  assert os.path.isdir(workdir / "checkpoints" / str(stopped))
