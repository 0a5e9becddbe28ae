"""Train-step time, FLOPs and MFU of configs on this machine.

  python bench/train_step.py configs/simvlm.py:tiny configs/simvlm.py:bench

For each config: the median time of >=10 warm train steps (one device: on CPU, XLA's threads
use every core) and the process CPU time per step (robust to other load on a shared machine:
what the step costs, not how long it waited for a core), the analytic FLOPs per step next to
XLA's cost analysis of the compiled step, and MFU against the f32 2048x2048 matmul peak
measured in the same process (DESIGN.md).

The batch is the first batch of the config's own data pipeline (its mixture, converter and
tokenizer over the sample data, generated on first use): real images, real token
statistics, media positions inside the sequence, documents with several images, padding as
the data has it. Step time does not depend on the values, but the loss does, and a batch the
model never sees in training says nothing about it.
"""
import argparse
import dataclasses
import json
import statistics
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax import config as config_lib
from vlm_jax import flops as flops_lib
from vlm_jax import sharding
from vlm_jax.data import families, pipeline
from vlm_jax.models import registry
from vlm_jax.train import metrics as metrics_lib
from vlm_jax.train import optimizer as optimizer_lib
from vlm_jax.train import state as state_lib
from vlm_jax.train import step as step_lib


def pipeline_batch(config) -> dict:
  """The first global batch of the config's train pipeline, as numpy arrays."""
  iterator = pipeline.make_train_iterator(config.data, config.model.name,
                                          global_batch_size=config.batch_size,
                                          seed=0, process_index=0, process_count=1)
  return {k: np.asarray(v) for k, v in next(iterator).items()}


@dataclasses.dataclass
class CompiledStep:
  """A config's train step compiled for one device, with its state and batch."""
  config: Any
  model: Any
  compiled: Any
  state: Any
  batch: dict
  rng: Any
  mesh: Any
  rules: tuple
  compile_s: float

  def run(self, steps: int) -> dict:
    """Runs `steps` steps; wall and process-CPU seconds of each, and the last metrics."""
    wall, cpu = [], []
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      for _ in range(steps):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        self.state, metrics = self.compiled(self.state, self.batch, self.rng)
        metrics["loss"].block_until_ready()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return {"wall": wall, "cpu": cpu, "loss": float(metrics["loss"])}


def compile_step(config, batch: dict, model=None) -> CompiledStep:
  """Builds `model` (default: the config's family) with the config's optimizer, state and
  frozen parameters on a 1x1x1 mesh and compiles its train step for `batch`."""
  config.mesh.shape = (1, 1, 1)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  rules = sharding.rules_from_config(config)
  model = model if model is not None else registry.build(config.model)
  tx = optimizer_lib.make_optimizer(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    example = {k: jnp.zeros(v.shape, v.dtype) for k, v in batch.items()}
    factory = state_lib.StateFactory(model, tx, config, mesh, example)
    state = factory.create(jax.random.key(0))
    batch = sharding.global_batch(batch, mesh, rules)
    step = jax.jit(step_lib.make_train_step(model, tx, config), donate_argnums=(0,))
    rng = jax.random.key(1)
    start = time.perf_counter()
    compiled = step.lower(state, batch, rng).compile()
  return CompiledStep(config, model, compiled, state, batch, rng, mesh, rules,
                      time.perf_counter() - start)


def bench_config(spec: str, peak: float, steps: int, overrides=()) -> dict:
  config = config_lib.load_config(spec, overrides)
  batch = pipeline_batch(config)
  # real input tokens of the batch (packed rows or not): what the step is useful for
  valid = batch.get("token_mask", batch.get("loss_mask"))
  real_tokens = int((valid > 0).sum()) if valid is not None else 0
  step = compile_step(config, batch)
  xla_flops = step.compiled.cost_analysis()["flops"]
  first = step.run(1)["loss"]
  step.run(1)  # warm-up
  timed = step.run(steps)
  analytic = flops_lib.flops_per_example(config, flops_lib.config_treatment(config))
  step_flops = analytic["train"] * config.batch_size
  median = statistics.median(timed["wall"])
  return {
      "config": spec, "batch_size": config.batch_size,
      "compile_s": round(step.compile_s, 1), "step_s_median": median,
      "step_s_min": min(timed["wall"]), "step_s_max": max(timed["wall"]),
      "cpu_s_median": statistics.median(timed["cpu"]),
      "first_loss": first,
      "analytic_train_flops_per_step": step_flops,
      "xla_train_flops_per_step": xla_flops,
      "analytic_over_xla": step_flops / xla_flops,
      "model_tflops_per_s": step_flops / median / 1e12,
      "real_tokens_per_step": real_tokens, "real_tokens_per_s": real_tokens / median,
      "mfu": step_flops / median / peak,
      **useful_work(config, batch, median),
  }


def useful_work(config, batch: dict, step_s: float) -> dict:
  """Examples per step (packed rows hold several: data/packing.py) and, for families that
  declare PACKING, the batch's real tokens / token slots as that layout counts them."""
  examples = (int(batch["segment_ids"].max(1).sum()) if "segment_ids" in batch
              else len(batch["tokens"]))
  out = {"examples_per_step": examples, "examples_per_s": examples / step_s}
  layout = getattr(families.load(config.model.name), "PACKING", None)
  if layout is not None:
    out["real_token_fraction"] = layout.efficiency([batch], config.data)
  return out


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
          f"CPU {result['cpu_s_median']:.2f} s/step, first loss {result['first_loss']:.2f}, "
          f"analytic/XLA FLOPs {result['analytic_over_xla']:.3f}, MFU {100 * result['mfu']:.1f}%")


if __name__ == "__main__":
  main()
