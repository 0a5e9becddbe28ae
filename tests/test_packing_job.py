"""Packing in a job: tiny MiniGPT-v2 (data/packing.py, the packer Flamingo, CogAgent and
Prismer share) and tiny SimVLM (data/packing_encoder_decoder.py) with packing on train as
2-process `vlm-launch local` jobs with default flags; a job killed with kill -9 of one
process after a checkpoint and rerun logs the losses of an uninterrupted job, and the job's
data counters (summed over processes) count examples and their tasks, not rows."""
import json
import os

import numpy as np
import pytest

from test_train import REPO
from test_user_data import straight_killed_and_resumed

STEPS, KILL_AFTER, ROWS = 15, 5, 8
# config, least number of the mixture's tasks seen
JOBS = {"minigpt_v2": ("minigpt_v2.py:tiny,packed=True", 3), "simvlm": ("simvlm.py:tiny,packed=True", 2)}


def _last_metrics(workdir) -> dict:
  with open(workdir / "metrics.jsonl") as f:
    return json.loads(f.readlines()[-1])


@pytest.mark.parametrize("family", sorted(JOBS))
def test_packed_two_process_job_resumes_with_the_losses_and_counts_of_an_uninterrupted_one(
    family, tmp_path):
  config, tasks = JOBS[family]
  straight, resumed, _ = straight_killed_and_resumed(
      tmp_path, os.path.join(REPO, "configs", config), [f"--config.batch_size={ROWS}"],
      steps=STEPS, kill_after=KILL_AFTER)
  assert sorted(resumed) == list(range(1, STEPS + 1))
  steps = range(KILL_AFTER + 1, STEPS + 1)
  np.testing.assert_allclose([resumed[s] for s in steps], [straight[s] for s in steps],
                             rtol=1e-6)
  want, got = _last_metrics(tmp_path / "straight"), _last_metrics(tmp_path / "killed")
  counts = {k: v for k, v in want.items() if k.startswith("data/")}
  assert counts == {k: v for k, v in got.items() if k.startswith("data/")}
  per_task = [v for k, v in counts.items() if k.startswith("data/examples/")]
  # rows hold about two examples each: more examples than rows, each with its task
  assert counts["data/examples"] == sum(per_task) > 1.5 * STEPS * ROWS, counts
  assert np.count_nonzero(per_task) >= tasks, counts
