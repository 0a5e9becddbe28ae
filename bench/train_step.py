"""Train-step time, FLOPs and MFU of configs on this machine.

  python bench/train_step.py configs/simvlm.py:tiny configs/simvlm.py:bench

For each config: the median time of >=10 warm train steps (one device: on CPU, XLA's threads
use every core), the analytic FLOPs per step next to XLA's cost analysis of the compiled step,
and MFU against the f32 2048x2048 matmul peak measured in the same process (DESIGN.md).
"""
import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax import config as config_lib
from vlm_jax import flops as flops_lib
from vlm_jax import sharding
from vlm_jax.models import registry
from vlm_jax.train import metrics as metrics_lib
from vlm_jax.train import optimizer as optimizer_lib
from vlm_jax.train import state as state_lib
from vlm_jax.train import step as step_lib


def random_batch(spec: dict, vocab_size: int, rng: np.random.Generator) -> dict:
  """A batch of the right shapes: random pixels and tokens, every mask on."""
  batch = {}
  for key, s in spec.items():
    if np.issubdtype(s.dtype, np.integer):
      batch[key] = rng.integers(4, vocab_size, s.shape).astype(s.dtype)
    elif "mask" in key or key == "loss_weight":
      batch[key] = np.ones(s.shape, s.dtype)
    else:
      batch[key] = rng.uniform(-1, 1, s.shape).astype(s.dtype)
  return batch


def bench_config(spec: str, peak: float, steps: int, overrides=()) -> dict:
  config = config_lib.load_config(spec, overrides)
  config.mesh.shape = (1, 1, 1)
  devices = jax.devices()[:1]
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.rules_from_config(config)
  model = registry.build(config.model)
  tx = optimizer_lib.make_optimizer(config)
  batch_spec = registry.batch_spec(config, config.batch_size)
  batch = random_batch(batch_spec, config.model.lm.vocab_size, np.random.default_rng(0))
  import flax.linen as nn
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    example = {k: jnp.zeros(v.shape, v.dtype) for k, v in batch.items()}
    factory = state_lib.StateFactory(model, tx, config, mesh, example)
    state = factory.create(jax.random.key(0))
    batch = sharding.global_batch(batch, mesh, rules)
    step = jax.jit(step_lib.make_train_step(model, tx, config), donate_argnums=(0,))
    rng = jax.random.key(1)
    start = time.perf_counter()
    compiled = step.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - start
    xla_flops = compiled.cost_analysis()["flops"]
    for _ in range(2):  # warm-up
      state, metrics = compiled(state, batch, rng)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      state, metrics = compiled(state, batch, rng)
      metrics["loss"].block_until_ready()
      times.append(time.perf_counter() - start)
  analytic = flops_lib.flops_per_example(config, flops_lib.config_treatment(config))
  step_flops = analytic["train"] * config.batch_size
  median = statistics.median(times)
  return {
      "config": spec, "batch_size": config.batch_size,
      "compile_s": round(compile_s, 1), "step_s_median": median,
      "step_s_min": min(times), "step_s_max": max(times),
      "analytic_train_flops_per_step": step_flops,
      "xla_train_flops_per_step": xla_flops,
      "analytic_over_xla": step_flops / xla_flops,
      "model_tflops_per_s": step_flops / median / 1e12,
      "mfu": step_flops / median / peak,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("configs", nargs="+", help="path.py:arg")
  parser.add_argument("--steps", type=int, default=10)
  args = parser.parse_args()
  peak = metrics_lib.measure_cpu_matmul_peak() if jax.default_backend() == "cpu" else \
      metrics_lib.peak_flops(1)[0]
  print(f"peak: {peak / 1e9:.1f} GFLOP/s ({jax.default_backend()}, {jax.devices()[0].device_kind})")
  for spec in args.configs:
    result = bench_config(spec, peak, args.steps)
    print(json.dumps(result))
    print(f"{spec}: step {result['step_s_median'] * 1e3:.1f} ms (median of {args.steps}), "
          f"analytic/XLA FLOPs {result['analytic_over_xla']:.3f}, MFU {100 * result['mfu']:.1f}%")


if __name__ == "__main__":
  main()
