"""A checkpoint is complete or ignored: cut-off writes never become the latest, damaged ones
are named and skipped, and the run resumes from the newest good one with identical losses."""
import os
import shutil
import signal

import reliability_runs as runs


def test_kill_9_during_a_checkpoint_write_resumes_from_the_previous_checkpoint(reference,
                                                                               tmp_path):
  ref_dir, ref_losses = reference
  workdir = tmp_path / "run"
  checkpoints = workdir / "checkpoints"
  writing = lambda: [n for n in (os.listdir(checkpoints) if checkpoints.is_dir() else [])
                     if n.startswith("10.orbax-checkpoint-tmp")]
  proc = runs.start(workdir, tmp_path / "first.log")
  try:
    runs.wait_until(writing, proc, "checkpoint 10 started writing", poll_s=0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    proc.kill()
  assert proc.returncode == -signal.SIGKILL
  leftover = writing()
  assert leftover and not (checkpoints / "10").exists(), os.listdir(checkpoints)

  resumed = runs.run(workdir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Ignored incomplete checkpoint write(s) {leftover}" in resumed.stdout
  assert "Resuming from checkpoint step 5 in" in resumed.stdout
  runs.assert_same_losses(workdir, ref_losses, range(6, runs.STEPS + 1))


def test_damaged_checkpoints_are_named_moved_aside_and_the_previous_one_is_used(reference,
                                                                               tmp_path):
  ref_dir, ref_losses = reference
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir, workdir)
  os.remove(workdir / "metrics.jsonl")  # every loss checked below comes from the rerun
  checkpoints = workdir / "checkpoints"
  assert sorted(os.listdir(checkpoints), key=int) == ["10", "15", "20"]
  # Step 20: the largest array file cut in half (a disk or copy that gave up).
  arrays = [p for p in (checkpoints / "20" / "state").rglob("*") if p.is_file()]
  largest = max(arrays, key=lambda p: p.stat().st_size)
  with open(largest, "r+b") as f:
    f.truncate(largest.stat().st_size // 2)
  # Step 15: the data iterator's state overwritten with garbage.
  for path in (checkpoints / "15" / "data").glob("process_*.json"):
    path.write_bytes(b"\x00garbage{")

  resumed = runs.run(workdir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  out = resumed.stdout
  for step in (20, 15):
    assert f"Checkpoint step {step} in {checkpoints} is damaged and was skipped:" in out, out
    assert f"Moved damaged checkpoint step {step} to {workdir / 'damaged_checkpoints'}" in out
  assert "Resuming from checkpoint step 10 in" in out
  assert sorted(runs.read_losses(workdir)) == list(range(11, runs.STEPS + 1))
  runs.assert_same_losses(workdir, ref_losses, range(11, runs.STEPS + 1))
  assert sorted(os.listdir(checkpoints), key=int) == ["10", "15", "20"]  # written again
