"""Checkpoints are read without pickle. (Data readers against decompression bombs and path
traversal: tests/data/test_bad_input.py.)"""
import pickle
import shutil

import jax
import numpy as np

import reliability_runs as runs
from test_train import tiny_config
from vlm_jax.train import loop


def test_restoring_a_checkpoint_never_unpickles(reference, tmp_path, monkeypatch):
  ref_dir, _ = reference
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir, workdir)

  def refuse(*args, **kwargs):
    raise AssertionError("a checkpoint was read with pickle")
  for name in ("load", "loads", "Unpickler"):
    monkeypatch.setattr(pickle, name, refuse)
  config = tiny_config(**{"num_train_steps": str(runs.STEPS), "checkpoint.every_steps": "5"})
  trainer = loop.Trainer(config, str(workdir))
  state = trainer.initial_state()
  assert int(state.step) == runs.STEPS
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
