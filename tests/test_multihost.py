"""Multi-host behaviour on one machine: `vlm-launch local --num-processes 2` (2 processes x 2
CPU devices, jax.distributed over gloo) against one process with 4 devices; evaluation, the
end-of-run generations and vlm-eval against one process; a killed process takes the job
down; a checkpoint resumes on a different mesh."""
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from test_train import read_losses, tiny_config
from vlm_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "simvlm.py") + ":tiny"
# A constant schedule (after warm-up) keeps num_train_steps out of the compiled step, so every
# run here with the same mesh shares one entry of the compilation cache.
CONSTANT = {"optimizer.schedule": "constant"}
TRAIN_ARGS = ["--config", TINY, "--config.batch_size=8", "--config.log_every_steps=1",
              "--config.checkpoint.every_steps=1000", "--config.checkpoint.async_save=False",
              "--config.optimizer.warmup_steps=2", "--config.optimizer.schedule=constant"]


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


def _vlm_launch(*args, timeout=900):
  return subprocess.run([sys.executable, "-m", "vlm_jax.cli.launch", "local", *args],
                        capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, "PYTHONPATH": REPO})


def _evals(workdir) -> dict[int, dict]:
  """step -> eval/* metrics (their wall-clock seconds left out) in metrics.jsonl."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      values = {k: v for k, v in record.items()
                if k.startswith("eval/") and not k.endswith("/seconds")}
      if values:
        out.setdefault(record["step"], {}).update(values)
  return out


def _assert_same_metrics(got: dict, want: dict):
  assert sorted(got) == sorted(want)
  for key in want:  # likelihoods to 1e-5; the rest (from generated or chosen tokens) exact
    tolerance = 1e-5 if key.endswith("log_likelihood") else 0
    np.testing.assert_allclose(got[key], want[key], rtol=tolerance, err_msg=key)


def _generations(stdout: str) -> str:
  return stdout[stdout.index("Generations for"):]


# The issue-19 command: evaluation every 10 steps, the end-of-run generations, default flags.
EVAL_RUN = ["--config", TINY, "--config.num_train_steps=20", "--config.evals.every_steps=10"]


def test_evaluation_and_generations_of_two_processes_equal_one_process(tmp_path):
  two = _vlm_launch("--num-processes", "2", "--cpu-devices-per-process", "1", *EVAL_RUN,
                    "--workdir", str(tmp_path / "two"))
  assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
  one = _vlm_launch("--cpu-devices-per-process", "2", *EVAL_RUN,
                    "--workdir", str(tmp_path / "one"))
  assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
  evals_two, evals_one = _evals(tmp_path / "two"), _evals(tmp_path / "one")
  assert sorted(evals_two) == sorted(evals_one) == [10, 20]
  assert any(k.endswith("log_likelihood") for k in evals_two[10])
  for step in (10, 20):
    _assert_same_metrics(evals_two[step], evals_one[step])
  # Printed once (by process 0), and the same greedy generations.
  assert two.stdout.count("Generations for 8 held-out examples") == 1
  assert "Generations for" not in (tmp_path / "two" / "launch_logs" / "process_1.log").read_text()
  assert _generations(two.stdout) == _generations(one.stdout)
  # The job's last checkpoint evaluated by one process (a pod run inspected on one machine).
  evaluated = subprocess.run([sys.executable, "-m", "vlm_jax.cli.eval", "--config", TINY,
                              "--workdir", str(tmp_path / "two")], capture_output=True,
                             text=True, timeout=900, env={**os.environ, "PYTHONPATH": REPO})
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  _assert_same_metrics(_evals(tmp_path / "two")[20], evals_two[20])


def test_vlm_eval_as_two_processes_equals_one_process(tmp_path):
  # Random weights generate to the maximum length, so the greedy tokens compared are many.
  args = ["--config", TINY, "--random-init", "--num-samples", "8"]
  runs = {}
  for count in ("1", "2"):
    workdir = tmp_path / count
    done = _vlm_launch("--num-processes", count, "--cpu-devices-per-process",
                       str(2 // int(count)), "--program", "eval", *args,
                       "--workdir", str(workdir))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs[count] = (done.stdout, _evals(workdir)[0])
  assert runs["2"][0].count("simvlm_scenes (step 0)") == 1
  assert (tmp_path / "2" / "launch_logs" / "eval_process_1.log").exists()
  _assert_same_metrics(runs["2"][1], runs["1"][1])
  printed = [[line for line in out.splitlines() if "model:" in line] for out, _ in runs.values()]
  assert printed[0] == printed[1] and any(len(line) > 20 for line in printed[0])


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


@pytest.mark.parametrize("family", ["flamingo", "prismer", "cogagent", "minigpt_v2"])
def test_each_family_trains_with_evaluation_as_two_processes(tmp_path, family):
  done = _vlm_launch("--num-processes", "2", "--cpu-devices-per-process", "1", "--config",
                     os.path.join(REPO, "configs", f"{family}.py") + ":tiny",
                     "--config.num_train_steps=2", "--config.evals.every_steps=2",
                     "--workdir", str(tmp_path))
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  evals = _evals(tmp_path)
  assert list(evals) == [2] and evals[2], evals
  assert done.stdout.count("Generations for") == 1


def test_a_preempted_two_process_job_resumes_and_a_later_stage_starts_from_it(tmp_path):
  steps, workdir = 30, tmp_path / "run"
  with open(tmp_path / "first.log", "w") as log:
    proc = subprocess.Popen(_launch(workdir, steps), stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": REPO})
  try:
    deadline = time.time() + 600
    while not (os.path.exists(workdir / "metrics.jsonl") and read_losses(workdir)):
      assert proc.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()
      time.sleep(0.1)
    # A maintenance event reaches every worker of a pod: SIGTERM to both processes.
    pids = re.findall(r"vlm-launch: process \d pid (\d+)", (tmp_path / "first.log").read_text())
    for pid in pids:
      os.kill(int(pid), 15)
    proc.wait(timeout=300)
  finally:
    proc.kill()
  first = (tmp_path / "first.log").read_text()
  assert proc.returncode == 75, first[-3000:]
  saved = int(re.search(r"checkpoint step (\d+) is in", first).group(1))
  assert 1 <= saved < steps, first[-3000:]

  resumed = subprocess.run(_launch(workdir, steps), capture_output=True, text=True,
                           timeout=900, env={**os.environ, "PYTHONPATH": REPO})
  assert resumed.returncode == 0, resumed.stdout[-3000:]
  assert f"Resuming from checkpoint step {saved} in" in resumed.stdout
  assert resumed.stdout.count("Generations for") == 1
  loop.train(tiny_config(**CONSTANT, num_train_steps=str(steps)), str(tmp_path / "straight"),
             devices=jax.devices()[:4])
  got, want = read_losses(workdir), read_losses(tmp_path / "straight")
  assert sorted(got) == list(range(1, steps + 1))
  np.testing.assert_allclose([got[s] for s in want], [want[s] for s in want], rtol=1e-5)

  stage2 = subprocess.run(_launch(tmp_path / "stage2", 2, f"--config.init_from={workdir}"),
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": REPO})
  assert stage2.returncode == 0, stage2.stdout[-3000:]
  assert re.search(rf"Initialised (\d+) of \1 parameter arrays from {workdir} \(step {steps}\)",
                   stage2.stdout), stage2.stdout[-3000:]
