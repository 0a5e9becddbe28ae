"""A family is a plug-in: a toy seventh family defined entirely in tests/toy_family (model,
data module, config; nothing under vlm_jax/ names it) trains through vlm-train (loss falls,
generations printed), is described by vlm-info, evaluated by vlm-eval and drawn by the
model-inspection helpers."""
import json
import os
import subprocess
import sys

import jax

from vlm_jax import config as config_lib
from vlm_jax.inspection import data as data_insp
from vlm_jax.inspection import model as model_insp

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
CONFIG = os.path.join(TESTS, "toy_family", "config.py") + ":tiny"


def run(command, *args):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, REPO]))
  result = subprocess.run([sys.executable, "-m", f"vlm_jax.cli.{command}", "--config", CONFIG,
                           *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=900)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  return result.stdout


def test_nothing_in_the_package_names_the_toy_family():
  for root, _, files in os.walk(os.path.join(REPO, "vlm_jax")):
    for name in files:
      if name.endswith(".py"):
        with open(os.path.join(root, name)) as f:
          assert "toy_family" not in f.read(), os.path.join(root, name)


def test_train_info_eval_and_inspection(tmp_path):
  workdir = str(tmp_path / "run")
  printed = run("train", "--workdir", workdir, "--num-samples", "4")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
  assert len(losses) == 6 and losses[-1] < 0.6 * losses[0], losses
  assert "Generations for 4 held-out examples of toy_scenes" in printed

  info = json.loads(run("info", "--no-shardings"))
  assert info["model"] == "toy_family" and info["params"]["total"] > 0
  assert info["flops_per_example"]["train"] > 0

  printed = run("eval", "--workdir", workdir, "--num-examples", "4", "--batch-size", "4")
  assert "toy_scenes (step 60):" in printed
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evaluated = json.loads(f.readlines()[-1])
  assert evaluated["step"] == 60 and 0 <= evaluated["eval/toy_scenes/cider"] <= 10

  config = config_lib.load_config(CONFIG)
  rows, _ = model_insp.param_rows(config, jax.device_count())
  assert [r[0] for r in rows] == ["lm", "patches", "TOTAL"]
  assert [name for name, _ in model_insp.flops_rows(config)][:3] == ["patches", "lm", "logits"]
  (batch,), _ = data_insp.read_batches(config, batch_size=2)
  (mask,) = model_insp.attention_masks(config, batch).values()
  assert mask.shape == (24, 24) and not mask[0, 1] and mask[1, 0]
