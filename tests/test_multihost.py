"""Multi-host behaviour on one machine: `vlm-launch local --num-processes 2` (2 processes x 2
CPU devices, jax.distributed over gloo) against one process with 4 devices; a killed process
takes the job down; a checkpoint resumes on a different mesh."""
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import jax
import numpy as np

from test_train import read_losses, tiny_config
from vlm_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "simvlm.py") + ":tiny"
# A constant schedule (after warm-up) keeps num_train_steps out of the compiled step, so every
# run here with the same mesh shares one entry of the compilation cache.
CONSTANT = {"optimizer.schedule": "constant"}
TRAIN_ARGS = ["--config", TINY, "--config.batch_size=8", "--config.log_every_steps=1",
              "--config.checkpoint.every_steps=1000", "--config.checkpoint.async_save=False",
              "--config.optimizer.warmup_steps=2", "--config.optimizer.schedule=constant",
              "--num-samples=0"]


def _launch(workdir, steps, *launcher_args):
  return [sys.executable, "-m", "vlm_jax.cli.launch", "local", "--num-processes", "2",
          "--cpu-devices-per-process", "2", *launcher_args, *TRAIN_ARGS,
          f"--config.num_train_steps={steps}", "--workdir", str(workdir)]


def test_two_processes_of_two_devices_give_the_losses_of_one_process_of_four(tmp_path):
  launched = subprocess.run(_launch(tmp_path / "two", 6), capture_output=True, text=True,
                            timeout=900, env={**os.environ, "PYTHONPATH": REPO})
  assert launched.returncode == 0, launched.stdout[-3000:]
  assert "over 4 device(s)" in launched.stdout  # one global mesh across both processes
  loop.train(tiny_config(**CONSTANT), str(tmp_path / "one"), devices=jax.devices()[:4])
  two, one = read_losses(tmp_path / "two"), read_losses(tmp_path / "one")
  assert sorted(two) == sorted(one) == list(range(1, 7))
  np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=1e-5)
  # Only process 0 writes metrics; each process's output is kept.
  assert os.path.exists(tmp_path / "two" / "launch_logs" / "process_1.log")


def test_killing_one_process_ends_the_other_within_the_heartbeat_timeout(tmp_path):
  proc = subprocess.Popen(_launch(tmp_path, 10_000, "--heartbeat-timeout-s", "10"),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "PYTHONPATH": REPO})
  lines = []
  reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),
                            daemon=True)
  reader.start()
  deadline = time.time() + 600
  while not any(re.match(r"step 2/", line) for line in lines):
    assert proc.poll() is None and time.time() < deadline, "".join(lines)[-3000:]
    time.sleep(0.1)
  pids = dict(re.findall(r"vlm-launch: process (\d) pid (\d+)", "".join(lines)))
  os.kill(int(pids["1"]), 9)
  killed_at = time.time()
  proc.wait(timeout=120)
  reader.join(timeout=10)
  output = "".join(lines)
  assert proc.returncode != 0
  assert time.time() - killed_at < 60, output[-3000:]
  # Process 0 stopped by itself with an error status; the launcher did not have to kill it.
  status = re.search(r"vlm-launch: process 0 exited with status (\d+)", output)
  assert status and int(status.group(1)) != 0, output[-3000:]
  assert "killing it" not in output
  # Either its collective saw the peer's connection drop and it exited at once (fail fast),
  # or it was waiting elsewhere and the coordination service ended it (no heartbeats).
  log0 = (tmp_path / "launch_logs" / "process_0.log").read_text()
  assert ("vlm_jax: process 0 of 2 failed; exiting without waiting" in log0 or
          "distributed service detected fatal errors" in log0), log0[-3000:]


def test_a_checkpoint_resumes_on_a_different_mesh_with_the_same_losses(tmp_path):
  steps = {"num_train_steps": "6", "checkpoint.every_steps": "3", **CONSTANT}
  fsdp8 = tiny_config(**steps, **{"mesh.shape": "(1, 8, 1)"})
  loop.train(fsdp8, str(tmp_path / "fsdp8"), devices=jax.devices()[:8])
  # Resume the step-3 checkpoint written by 8 devices (parameters sharded over fsdp) on 4
  # devices, data-parallel only.
  shutil.copytree(tmp_path / "fsdp8" / "checkpoints" / "3", tmp_path / "dp4" / "checkpoints" / "3")
  dp4 = tiny_config(**steps, **{"mesh.shape": "(4, 1, 1)"})
  trainer = loop.Trainer(dp4, str(tmp_path / "dp4"), devices=jax.devices()[:4])
  restored = trainer.initial_state()
  assert int(restored.step) == 3
  embedding = jax.tree.leaves(restored.params)[0]
  assert embedding.sharding.mesh.shape == {"data": 4, "fsdp": 1, "tensor": 1}
  trainer.run()
  want, got = read_losses(tmp_path / "fsdp8"), read_losses(tmp_path / "dp4")
  assert sorted(got) == [4, 5, 6]
  np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=1e-5)
