"""Pretraining on a user's own data, end to end (issue 20).

A tasks module outside the package (seqio Tasks and a Mixture over TFDS datasets built here,
tests/user_data.py), directories written by `vlm-data ingest` (img2dataset pairs, MMC4
documents) and ArrayRecord TFDS datasets are named, with rates and loss weights, in
config.data.mixture on the command line of a 2-process `vlm-launch local` job. For Flamingo,
MiniGPT-v2 (a grounding TFDS dataset, no synthetic task) and SimVLM (a seqio mixture) tiny:
the loss falls, the realised rates in metrics.jsonl are within 2 points of the declared ones,
every example carries its source's loss weight, a job with one process killed with kill -9
and resumed logs the losses of an uninterrupted job (a seqio source read again up to the
restored position), and vlm-eval evaluates the TFDS and seqio sources by name (a seqio task
with its own metric function).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from test_train import REPO, read_losses
from vlm_jax import config as config_lib
from vlm_jax.cli import eval as eval_cli
from vlm_jax.data import health, pipeline

STEPS, KILL_AFTER = 30, 10
CAPTIONS, GROUNDING = "tfds:vlm_test_captions:1.0.0", "tfds:vlm_test_grounding:1.0.0"
TIMEOUT_S = 900


def _overrides(user_data, mixture) -> list[str]:
  return [f"--config.data.mixture={mixture}",
          f"--config.data.tasks_module={user_data.tasks_module}",
          f"--config.data.tfds_data_dir={user_data.tfds}", "--config.batch_size=8"]


def _train(config, workdir, overrides, log, steps=STEPS):
  """A 2-process `vlm-launch local` job (2 CPU devices each), as users' jobs are."""
  command = [sys.executable, "-m", "vlm_jax.cli.launch", "local", "--num-processes", "2",
             "--cpu-devices-per-process", "2", "--config", config, "--workdir", str(workdir),
             f"--config.num_train_steps={steps}", "--config.log_every_steps=1",
             "--config.checkpoint.every_steps=5", "--num-samples=0", *overrides]
  return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "PYTHONPATH": REPO})


def _finish(proc, log_path):
  proc.wait(timeout=TIMEOUT_S)
  with open(log_path) as f:
    output = f.read()
  assert proc.returncode == 0, output[-3000:]
  return output


def straight_killed_and_resumed(tmp_path, config, overrides, steps=STEPS,
                                kill_after=KILL_AFTER) -> tuple[dict, dict, str]:
  """(losses of an uninterrupted run of `steps`, losses of a run killed with kill -9 after
  checkpoint `kill_after` (a multiple of 5) and resumed, the resumed run's output); the first
  two run side by side."""
  logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("straight", "killed",
                                                                  "resumed")}
  straight = _train(config, tmp_path / "straight", overrides, logs["straight"], steps)
  killed = _train(config, tmp_path / "killed", overrides, logs["killed"], steps)
  checkpoint = tmp_path / "killed" / "checkpoints" / str(kill_after)
  deadline = time.time() + TIMEOUT_S
  while not checkpoint.is_dir():
    assert killed.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
    assert time.time() < deadline, "timed out waiting for the checkpoint"
    time.sleep(0.02)
  # kill -9 one process of the job: the other stops and the launcher fails.
  pid = re.search(r"vlm-launch: process 1 pid (\d+)", (tmp_path / "killed.log").read_text())
  os.kill(int(pid.group(1)), signal.SIGKILL)
  killed.wait(timeout=180)
  assert killed.returncode != 0
  assert steps not in read_losses(tmp_path / "killed"), "killed too late: the run had finished"
  _finish(straight, tmp_path / "straight.log")
  resumed = _train(config, tmp_path / "killed", overrides, logs["resumed"], steps)
  output = _finish(resumed, tmp_path / "resumed.log")
  for log in logs.values():
    log.close()
  assert "Resuming from checkpoint step" in output
  return read_losses(tmp_path / "straight"), read_losses(tmp_path / "killed"), output


def assert_trained_resumed_and_mixed(straight, resumed, tmp_path, declared_rates):
  assert np.mean([straight[s] for s in range(STEPS - 4, STEPS + 1)]) < 0.85 * np.mean(
      [straight[s] for s in range(1, 6)]), straight
  assert sorted(resumed) == list(range(1, STEPS + 1))
  steps = range(KILL_AFTER + 1, STEPS + 1)
  np.testing.assert_allclose([resumed[s] for s in steps], [straight[s] for s in steps],
                             rtol=1e-6)
  total = sum(declared_rates.values())
  for run in ("straight", "killed"):  # the resumed run's counts continue the checkpoint's
    with open(tmp_path / run / "metrics.jsonl") as f:
      last = [json.loads(line) for line in f][-1]
    assert last["data/examples"] == STEPS * 8
    for name, rate in declared_rates.items():
      assert abs(last[f"data/rate/{name}"] - rate / total) < 0.02, (name, last)


def assert_loss_weights_per_example(config, declared_weights, count=64):
  """The examples of each source carry its declared loss weight (the step multiplies each
  example's token losses by it, train/step.py)."""
  family = config.model.name
  processor = pipeline.make_processor(config.data, family, seed=0)
  records = pipeline.mixed_records(config.data, family, seed=0)
  seen = set()
  for index in range(count):
    spec, raw = records[index]
    example = processor(index, (spec, raw))
    if not isinstance(example, health.Skipped):
      assert example["loss_weight"] == np.float32(declared_weights[spec.name]), spec.name
      seen.add(spec.name)
  assert seen == set(declared_weights)


def evaluate(config_path, workdir, overrides, tasks, capsys) -> dict:
  """vlm-eval on the run's newest checkpoint: {eval/<task>/<metric>: value}."""
  eval_cli.main(["--config", config_path, "--workdir", str(workdir), "--num-examples", "8",
                 "--num-samples", "1", *[f"--task={t}" for t in tasks], *overrides])
  printed = capsys.readouterr().out
  assert all(f"{task} (step {STEPS})" in printed for task in tasks), printed
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {k: v for k, v in json.loads(f.readlines()[-1]).items() if k.startswith("eval/")}


def _config(path, overrides):
  pairs = [o[len("--config."):].split("=", 1) for o in overrides]
  return config_lib.load_config(path, [tuple(p) for p in pairs])


@pytest.mark.parametrize("family", ["flamingo", "minigpt_v2", "simvlm"])
def test_train_on_own_data_resume_and_evaluate_by_name(family, user_data, tmp_path, capsys):
  # family: (mixture, declared rates, declared loss weights, sources to evaluate, a metric
  # each must report)
  mixture, rates, weights, evals = {
      "flamingo": (
          f"user_captions rate=0.3 weight=0.2 name=captions; {user_data.laion} rate=0.3 "
          f"weight=0.2 name=laion; {user_data.mmc4} rate=0.4 weight=1 name=mmc4",
          {"captions": 0.3, "laion": 0.3, "mmc4": 0.4},
          {"captions": 0.2, "laion": 0.2, "mmc4": 1.0}, {"captions": "exact"}),
      "minigpt_v2": (
          f"{GROUNDING} template=refer rate=0.5 name=refer; {GROUNDING} template=grounding "
          f"rate=0.3 weight=0.5 name=grounded; {GROUNDING} template=identify rate=0.2 "
          "weight=2 name=identify",
          {"refer": 0.5, "grounded": 0.3, "identify": 0.2},
          {"refer": 1.0, "grounded": 0.5, "identify": 2.0}, {"refer": "iou@0.5"}),
      "simvlm": (
          f"user_pretrain rate=0.8 weight=1; {CAPTIONS} rate=0.2 weight=0.5 name=tfds_captions",
          {"user_captions": 0.6, "user_text": 0.2, "tfds_captions": 0.2},
          {"user_captions": 1.0, "user_text": 1.0, "tfds_captions": 0.5},
          {"user_captions": "exact", "tfds_captions": "cider"}),
  }[family]
  config_path = os.path.join(REPO, "configs", f"{family}.py") + ":tiny"
  overrides = _overrides(user_data, mixture)
  straight, resumed, _ = straight_killed_and_resumed(tmp_path, config_path, overrides)
  assert_trained_resumed_and_mixed(straight, resumed, tmp_path, rates)
  assert_loss_weights_per_example(_config(config_path, overrides), weights)
  metrics = evaluate(config_path, tmp_path / "straight", overrides, list(evals), capsys)
  for task, metric in evals.items():
    assert f"eval/{task}/{metric}" in metrics, metrics
