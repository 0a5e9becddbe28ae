"""Workdir not writable or full: a clear error before training starts, or at the failed save
without touching the previous checkpoint. "Full" is real: RLIMIT_FSIZE makes writes past a
size fail with EFBIG, as a full disk fails them with ENOSPC."""
import hashlib
import os
import shutil
from collections import namedtuple

import pytest

import reliability_runs as runs
from test_train import REPO, tiny_config
from vlm_jax.cli import train as train_cli
from vlm_jax.train import loop, validate


def _digest(directory) -> dict:
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_workdir_that_cannot_be_created_fails_before_training(tmp_path, capsys):
  (tmp_path / "a_file").write_text("not a directory")
  workdir = tmp_path / "a_file" / "run"
  argv = ["--config", os.path.join(REPO, "configs", "simvlm.py") + ":tiny",
          "--workdir", str(workdir), "--num-samples=0"]
  with pytest.raises(SystemExit) as exit_info:
    train_cli.main(argv)
  assert exit_info.value.code == train_cli.EXIT_WORKDIR == 74
  assert capsys.readouterr().err == (
      f"vlm-train: error: --workdir {workdir} cannot be written (Not a directory); choose a "
      "writable directory with free space.\n")


def test_a_full_workdir_fails_before_training(tmp_path):
  result = runs.run(tmp_path, file_size_limit=0)
  assert result.returncode == 74, result.stderr[-3000:]
  assert (f"vlm-train: error: --workdir {tmp_path} cannot be written (File too large)"
          in result.stderr)
  assert "Model FLOPs" not in result.stdout and os.listdir(tmp_path) == []


def test_too_little_free_space_for_a_checkpoint_fails_before_training(tmp_path, monkeypatch):
  usage = namedtuple("usage", "total used free")
  monkeypatch.setattr(validate.shutil, "disk_usage", lambda path: usage(2**30, 2**30, 2**20))
  with pytest.raises(validate.WorkdirError, match=r"has 1.0 MiB free but one checkpoint needs "
                     r"about [0-9.]+ MiB; free space or choose another --workdir."):
    loop.Trainer(tiny_config(), str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_a_failed_save_names_the_step_and_leaves_the_previous_checkpoint_intact(reference,
                                                                                tmp_path):
  ref_dir, _ = reference
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir, workdir)
  checkpoints = workdir / "checkpoints"
  for step in ("15", "20"):
    shutil.rmtree(checkpoints / step)
  before = _digest(checkpoints / "10")
  # Metrics lines fit under 1 MiB; checkpoint array files (several MiB) do not.
  result = runs.run(workdir, file_size_limit=2**20)
  assert result.returncode == 74, result.stderr[-3000:]
  err = result.stderr
  assert ("vlm-train: error: saving checkpoint step 15 failed: [Errno 27] File too large: "
          in err), err[-3000:]
  assert (f"checkpoint step 10 in {checkpoints} is intact. Free disk space or choose another "
          "--workdir, then rerun the same command to resume.") in err
  assert _digest(checkpoints / "10") == before
  assert [n for n in os.listdir(checkpoints) if n.isdigit()] == ["10"]
