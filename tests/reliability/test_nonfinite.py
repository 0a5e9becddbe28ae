"""NaN/inf loss: "stop" names the step and the last good checkpoint (exit 3); "skip" counts
skipped updates and rewinds to the last checkpoint after K consecutive bad steps.

The fault is a NaN loss weight in the batch of chosen steps (VLM_JAX_INJECT_NONFINITE_STEPS),
injected into real runs; the train step itself is the production one."""
import json
import math
import os

import reliability_runs as runs
from vlm_jax.train import nonfinite


def _env(steps: str) -> dict:
  return dict(os.environ, **{nonfinite.INJECT_ENV: steps})


def test_stop_policy_names_the_step_and_the_last_good_checkpoint(tmp_path):
  result = runs.run(tmp_path, env=_env("7"))
  assert result.returncode == 3, result.stderr[-3000:]
  assert (f"vlm-train: error: non-finite loss or gradient norm at step 7; the update was "
          f"skipped and training stopped; the last good checkpoint is step 5 in "
          f"{tmp_path / 'checkpoints'}.") in result.stderr
  assert max(runs.read_losses(tmp_path)) == 7


def test_skip_policy_counts_skipped_updates_and_rewinds_after_k_bad_steps(reference, tmp_path):
  ref_dir, ref_losses = reference
  result = runs.run(tmp_path, "--config.nonfinite.policy=skip",
                    "--config.nonfinite.rewind_after=2", env=_env("7 12 13"))
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "Skipped the non-finite update of step 7 (1 skipped so far)." in out
  assert "Skipped the non-finite update of step 13 (3 skipped so far)." in out
  assert ("Rewinding to checkpoint step 10 after non-finite steps 12-13 (rewind 1 of at most 3); "
          "the data iterator is not rewound.") in out
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  logged = [r["step"] for r in records]
  # 1..13, then 11..20 again after the rewind.
  assert logged == list(range(1, 14)) + list(range(11, runs.STEPS + 1))
  bad = [r["step"] for r in records if r["nonfinite"]]
  assert bad == [7, 12, 13]
  # Until the first fault the run is the reference run; afterwards every logged loss is finite.
  runs.assert_same_losses(tmp_path, ref_losses, range(1, 7))
  assert all(math.isfinite(r["loss"]) for r in records[13:])
  # The update of step 7 was skipped, so step 8 onwards differs from the reference.
  assert records[7]["loss"] != ref_losses[8]
  # The rewound state restarted at step 10: the step-based schedule repeats from step 11.
  with open(ref_dir / "metrics.jsonl") as f:
    ref_lr = {r["step"]: r["learning_rate"] for r in map(json.loads, f)}
  assert [r["learning_rate"] for r in records[13:]] == [ref_lr[s] for s in range(11, 21)]
