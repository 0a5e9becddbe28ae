"""vlm-compile on this CPU machine: Flamingo-9B's train step compiles for a v5p slice and fits;
a model that cannot fit one chip and a mesh that does not divide the topology fail clearly.

Needs libtpu (`pip install -e '.[test,tpu]'`)."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def vlm_compile(*args):
  command = [sys.executable, "-m", "vlm_jax.cli.compile", *args]
  return subprocess.run(command, capture_output=True, text=True, timeout=900,
                        env={**os.environ, "PYTHONPATH": REPO})


def test_flamingo_9b_fits_a_v5p_8_chip_slice_with_fsdp_and_remat():
  result = vlm_compile("--config", os.path.join(REPO, "configs/flamingo.py:9b"),
                       "--topology", "v5p:2x2x2", "--config.mesh.shape=(1,8,1)",
                       "--config.model.remat_policy=full", "--json")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.splitlines()[-1])
  assert report["fits"] and report["num_devices"] == 8
  assert report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  # 8.6B float32 parameters sharded 8 ways (4.0 GiB per chip), plus the Adam moments of the
  # 1.3B trainable ones (resampler, gated blocks) and the batch.
  assert 4.5 * 2**30 < report["argument_bytes"] < 7 * 2**30, report
  assert 0 < report["peak_bytes"] < report["hbm_bytes"] == 95 * 2**30
  # fsdp gathers parameters and reduce-scatters gradients.
  assert report["collectives"].get("all-gather", 0) > 0
  assert report["xla_flops_per_device"] > 0 and report["analytic_flops_per_device"] > 0
  assert "fits" in result.stdout


def test_a_7b_model_with_unsharded_parameters_on_v5e_chips_does_not_fit():
  # Data parallelism only: every 16 GiB chip would hold all 7.78B float32 parameters (29 GiB).
  result = vlm_compile("--config", os.path.join(REPO, "configs/minigpt_v2.py:7b"),
                       "--topology", "v5e:2x2", "--config.mesh.shape=(4,1,1)")
  assert result.returncode == 4, result.stderr[-3000:]
  assert "does not fit: parameters and optimizer state alone need 2" in result.stderr
  assert "16 GiB HBM of a TPU v5 lite" in result.stderr


def test_a_mesh_that_does_not_divide_the_topology_is_a_usage_error():
  result = vlm_compile("--config", os.path.join(REPO, "configs/simvlm.py:tiny"),
                       "--topology", "v5p:2x2x2", "--config.mesh.shape=(3,1,1)")
  assert result.returncode == 2
  assert "the mesh does not divide topology v5p:2x2x2 (8 devices)" in result.stderr
  assert "config.mesh.shape=(3, 1, 1)" in result.stderr


def test_search_rejects_what_does_not_fit_and_returns_the_best_that_fits():
  # SimVLM bench with 40+40 layers (0.9B parameters, 13.2 GiB with Adam per device when
  # unsharded) on 4 v5e chips of 16 GiB: data parallelism alone runs out of HBM (XLA says so
  # in seconds); fsdp over 2 chips fits. The first rung (no remat, 1 micro-batch) tries the
  # data-parallel split first (least communication) and stops at the first that fits.
  result = vlm_compile("--config", os.path.join(REPO, "configs/simvlm.py:bench"),
                       "--topology", "v5e:2x2", "--config.model.lm.encoder_layers=40",
                       "--config.model.lm.decoder_layers=40", "--search", "--json")
  assert result.returncode == 0, result.stderr[-3000:]
  found = json.loads(result.stdout.splitlines()[-1])
  tried = [(t["remat"], t["micro_batches"], tuple(t["mesh"]), t["verdict"])
           for t in found["tried"]]
  assert tried == [("none", 1, (4, 1, 1), "does not fit"), ("none", 1, (2, 2, 1), "fits")]
  rejected, best = found["tried"]
  assert rejected["peak_bytes"] > rejected["hbm_bytes"] == 16 * 2**30  # XLA's own figure
  assert best == found["best"] and best["peak_bytes"] < best["hbm_bytes"]
  assert best["xla_flops_per_device"] > 0 and best["estimated_step_s"] > 0
  # The estimate: analytic FLOPs per chip over a v5e's 197 TFLOP/s bf16 peak.
  assert best["estimated_step_s"] == best["analytic_flops_per_device"] / 197e12
  overrides = ("--config.model.remat_policy=none --config.grad_accum_steps=1 "
               "--config.mesh.shape='(2,2,1)'")
  assert found["overrides"] == overrides.split()
  assert f"best fitting setting: {overrides}" in result.stdout
  assert "could not determine TPU worker hostnames" not in result.stderr


def test_search_order_tries_cheaper_settings_first():
  from vlm_jax import fit_search  # pylint: disable=g-import-not-at-top
  # Splits of 8 devices whose batch shards (data x fsdp) divide a batch of 4, least
  # communication first: less tensor, then less fsdp.
  assert fit_search.mesh_splits(8, 4) == [(4, 1, 2), (2, 2, 2), (1, 4, 2), (2, 1, 4),
                                          (1, 2, 4), (1, 1, 8)]
  assert fit_search.rungs(("full", "dots", "none"), (2, 1)) == [
      ("none", 1), ("dots", 1), ("none", 2), ("dots", 2), ("full", 1), ("full", 2)]
  assert fit_search.parse_meshes("(1,4,1) 4x1x1") == [(1, 4, 1), (4, 1, 1)]


def test_tiny_simvlm_compiles_for_tpu_with_the_splash_attention_kernel():
  # Encoder key padding, causal decoder, padded cross-attention: each a Pallas kernel in the
  # forward pass (scanned: once per stack) plus its two backward kernels (dq, dk/dv).
  result = vlm_compile("--config", os.path.join(REPO, "configs/simvlm.py:tiny"),
                       "--topology", "v5p:2x2x1", "--config.mesh.shape=(1,-1,1)",
                       "--config.model.attention_impl=splash", "--json")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.splitlines()[-1])
  assert report["fits"] and report["num_devices"] == 4
  assert report["pallas_kernels"] == 9, report
  assert "Pallas kernels in the step's HLO (fused attention; static count): 9" in result.stdout
