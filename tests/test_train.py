"""The training loop on the tiny SimVLM config: loss falls, resume is exact, meshes agree."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import traverse_util

from vlm_jax import config as config_lib
from vlm_jax import storage
from vlm_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "simvlm.py") + ":tiny"


def tiny_config(**overrides):
  defaults = {"batch_size": "8", "num_train_steps": "6", "log_every_steps": "1",
              "checkpoint.every_steps": "1000", "checkpoint.async_save": "False",
              "optimizer.warmup_steps": "2"}
  defaults.update(overrides)
  return config_lib.load_config(TINY, list(defaults.items()))


def read_losses(workdir) -> dict[int, float]:
  """step -> loss (local or gs:// workdir); a step logged twice (replayed after a resume)
  keeps its last value."""
  losses = {}
  for line in storage.read_text(storage.join(workdir, "metrics.jsonl")).splitlines():
    record = json.loads(line)
    losses[record["step"]] = record["loss"]
  return losses


def test_loss_falls(tmp_path):
  config = tiny_config(num_train_steps="60", log_every_steps="10",
                       **{"optimizer.learning_rate": "3e-3", "optimizer.warmup_steps": "5"})
  loop.train(config, str(tmp_path))
  losses = read_losses(tmp_path)
  assert losses[60] < 0.8 * losses[10], losses


def test_one_device_and_eight_devices_give_the_same_losses(tmp_path):
  one = tiny_config(**{"mesh.shape": "(1, 1, 1)"})
  eight = tiny_config(**{"mesh.shape": "(2, 2, 2)"})
  loop.train(one, str(tmp_path / "one"), devices=jax.devices()[:1])
  loop.train(eight, str(tmp_path / "eight"), devices=jax.devices()[:8])
  a, b = read_losses(tmp_path / "one"), read_losses(tmp_path / "eight")
  assert sorted(a) == sorted(b) == list(range(1, 7))
  np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-4)


def test_gradient_accumulation_equals_the_full_batch(tmp_path):
  full = loop.Trainer(tiny_config(num_train_steps="1"), str(tmp_path / "full"))
  accum = loop.Trainer(tiny_config(num_train_steps="1", grad_accum_steps="2"),
                       str(tmp_path / "accum"))
  a, b = full.run(), accum.run()
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
  assert read_losses(tmp_path / "full")[1] == pytest.approx(read_losses(tmp_path / "accum")[1],
                                                             rel=1e-5)


def test_frozen_parameters_are_bit_identical_and_not_differentiated(tmp_path):
  config = tiny_config(num_train_steps="3")
  probe = loop.Trainer(config, str(tmp_path / "probe"))
  top = sorted(probe.factory.abstract_params)
  frozen_module = top[0]
  config.frozen = (f"{frozen_module}/.*",)
  trainer = loop.Trainer(config, str(tmp_path / "run"))
  before = jax.device_get(trainer.initial_state())
  after = jax.device_get(trainer.run())
  assert frozen_module not in after.params and frozen_module in after.frozen
  # The optimizer holds moments for trainable parameters only: nothing else was differentiated.
  mu_keys = {k for k in traverse_util.flatten_dict(after.opt_state[1][0].mu, sep="/")}
  assert mu_keys == set(traverse_util.flatten_dict(after.params, sep="/"))
  for x, y in zip(jax.tree.leaves(before.frozen), jax.tree.leaves(after.frozen)):
    np.testing.assert_array_equal(x, y)
  changed = [not np.array_equal(x, y)
             for x, y in zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params))]
  assert any(changed)


def test_a_frozen_pattern_that_matches_nothing_is_an_error(tmp_path):
  config = tiny_config()
  config.frozen = ("no_such_module/.*",)
  with pytest.raises(ValueError, match="no_such_module"):
    loop.Trainer(config, str(tmp_path))


def _train_command(workdir, steps):
  return [sys.executable, "-m", "vlm_jax.cli.train", "--config", TINY, "--workdir", str(workdir),
          "--config.batch_size=8", f"--config.num_train_steps={steps}",
          "--config.log_every_steps=1", "--config.checkpoint.every_steps=5",
          "--config.optimizer.warmup_steps=2", "--num-samples=0"]


def test_kill_9_then_resume_gives_the_losses_of_an_uninterrupted_run(tmp_path):
  steps = 40
  subprocess.run(_train_command(tmp_path / "straight", steps), check=True,
                 capture_output=True, timeout=600)
  killed_dir = tmp_path / "killed"
  proc = subprocess.Popen(_train_command(killed_dir, steps),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not os.path.isdir(killed_dir / "checkpoints" / "10") and time.time() < deadline:
    assert proc.poll() is None, "the run ended before it could be killed"
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  assert proc.returncode == -signal.SIGKILL
  assert steps not in read_losses(killed_dir), "killed too late: the run had finished"
  resumed = subprocess.run(_train_command(killed_dir, steps), check=True,
                           capture_output=True, text=True, timeout=600)
  assert "Resuming from checkpoint step" in resumed.stdout
  straight, after_kill = read_losses(tmp_path / "straight"), read_losses(killed_dir)
  assert sorted(after_kill) == list(range(1, steps + 1))
  np.testing.assert_allclose([after_kill[s] for s in range(11, steps + 1)],
                             [straight[s] for s in range(11, steps + 1)], rtol=1e-6)


def test_nonfinite_loss_stops_with_the_step_and_last_checkpoint(tmp_path):
  command = _train_command(tmp_path, 20) + ["--config.optimizer.learning_rate=1e30",
                                            "--config.optimizer.grad_clip_norm=0.0"]
  result = subprocess.run(command, capture_output=True, text=True, timeout=600)
  assert result.returncode == 3, result.stderr[-2000:]
  assert "non-finite loss or gradient norm at step" in result.stderr
