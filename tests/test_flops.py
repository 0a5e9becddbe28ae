"""Analytic FLOPs vs XLA's cost analysis of the compiled forward pass (CPU)."""
import jax
import flax.linen as nn
import pytest

from vlm_jax import config as config_lib
from vlm_jax import flops
from vlm_jax.models import registry
from vlm_jax.nn import flops as nn_flops


def xla_forward_flops(config, batch_size=2):
  # Unscanned: XLA's cost analysis counts a while-loop body once, not once per layer.
  config.model.scan_layers = False
  model = registry.build(config.model)
  spec = registry.batch_spec(config, batch_size)
  params = jax.eval_shape(lambda b: nn.unbox(model.init(jax.random.key(0), b)["params"]), spec)
  compiled = jax.jit(lambda p, b: model.apply({"params": p}, b)).lower(params, spec).compile()
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  return analysis["flops"] / batch_size


# tiny is narrow (width 128), so element-wise work is ~6% on top; it is not model FLOPs.
# Packed rows: the analytic count covers every image slot and the rows' longer streams.
@pytest.mark.parametrize("size,tolerance", [("bench", 0.05), ("tiny", 0.08),
                                            ("tiny,packed=True", 0.08)])
def test_analytic_forward_flops_match_xla(size, tolerance):
  config = config_lib.load_config(f"configs/simvlm.py:{size}")
  analytic = flops.flops_per_example(config, causal_half=False)["forward"]
  measured = xla_forward_flops(config)
  # XLA also counts element-wise work (norms, GELU, softmax), so it is a little higher.
  assert analytic <= measured <= analytic * (1 + tolerance), measured / analytic


def test_train_rules_per_part():
  config = config_lib.load_config("configs/simvlm.py:tiny")
  result = flops.flops_per_example(config)
  parts = result["parts"]
  assert set(parts) == {"image_embedder", "encoder", "decoder", "logits"}
  assert result["train"] == pytest.approx(3 * result["forward"])
  treatment = {"image_embedder": flops.FROZEN_STOPGRAD, "encoder": flops.FROZEN_PASSTHROUGH}
  expected = (parts["image_embedder"] + 2 * parts["encoder"]
              + 3 * (parts["decoder"] + parts["logits"]))
  assert flops.train_flops(parts, treatment) == pytest.approx(expected)
  full = flops.forward_parts(config, causal_half=False)
  assert full["decoder"] > parts["decoder"]  # causal scores counted at half for MFU


def test_conv_stem_flops_resnet50_stages():
  # ResNet-50 at 224 px is ~4.1 GMACs, of which stage 4 + head ~0.8: ~3.3 GMACs remain.
  total, grid = nn_flops.conv_stem(224, 64, (3, 4, 6), out_features=1)
  assert grid == 14
  assert 2 * 3.1e9 < total < 2 * 3.45e9
