"""Ahead-of-time compilation of the train step for a TPU topology, on any machine (even CPU).

libtpu (the `[tpu]` extra) describes a topology such as `v5p:4x4x4` without the hardware;
the config's mesh is laid over its devices, the state and batch become ShapeDtypeStructs
with the config's shardings, and the very step vlm-train runs is lowered and compiled. XLA
then reports per-device memory (arguments, temporaries, outputs) and FLOPs, and the HLO
shows which collectives the shardings cost. Nothing is allocated.
"""
import dataclasses
import math
import re
import time

import flax.linen as nn
import jax
import numpy as np

from vlm_jax import flops as flops_lib
from vlm_jax import sharding
from vlm_jax.models import registry
from vlm_jax.train import optimizer as optimizer_lib
from vlm_jax.train import state as state_lib
from vlm_jax.train import step as step_lib

GIB = 2**30
# HBM per JAX device (a chip, or a core where each core is its own device: v2, v3), from the
# Cloud TPU system-architecture pages.
HBM_BYTES = {"TPU v2": 8 * GIB, "TPU v3": 16 * GIB, "TPU v4": 32 * GIB,
             "TPU v5 lite": 16 * GIB, "TPU v5": 95 * GIB, "TPU v6 lite": 32 * GIB}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE_OP = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


_ADVICE = ("shard more (config.mesh.shape), lower the batch per device (config.batch_size, "
           "or micro-batches: config.grad_accum_steps), or set config.model.remat_policy=full.")


class DoesNotFit(RuntimeError):
  """The step needs more memory per device than the chip's HBM; `report` has what is known
  (the peak when XLA compiled the step, else the arguments alone)."""

  def __init__(self, message: str, report: "Report"):
    super().__init__(message)
    self.report = report


@dataclasses.dataclass
class Report:
  topology: str
  device_kind: str
  num_devices: int
  mesh: dict
  hbm_bytes: int
  argument_bytes: int = 0
  output_bytes: int = 0
  alias_bytes: int = 0
  temp_bytes: int = 0
  code_bytes: int = 0
  xla_flops_per_device: float = 0.0
  analytic_flops_per_device: float = 0.0
  collectives: dict = dataclasses.field(default_factory=dict)
  pallas_kernels: int = 0  # Mosaic custom calls: fused attention (config.model.attention_impl)
  compile_s: float = 0.0

  @property
  def peak_bytes(self) -> int:
    """Live at once: arguments, temporaries and the outputs not written over (donated) args."""
    return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes + \
        self.code_bytes

  @property
  def fits(self) -> bool:
    return self.peak_bytes <= self.hbm_bytes

  def lines(self) -> list[str]:
    g = lambda b: f"{b / GIB:.2f} GiB"
    ops = ", ".join(f"{k} {v}" for k, v in self.collectives.items()) or "none"
    verdict = "fits" if self.fits else "DOES NOT FIT"
    return [
        f"topology {self.topology}: {self.num_devices} x {self.device_kind} "
        f"({g(self.hbm_bytes)} HBM each); mesh {self.mesh}",
        f"per device: arguments {g(self.argument_bytes)}, temporaries {g(self.temp_bytes)}, "
        f"outputs {g(self.output_bytes)} (of which donated into arguments "
        f"{g(self.alias_bytes)}), code {g(self.code_bytes)}",
        f"per device peak {g(self.peak_bytes)} of {g(self.hbm_bytes)} HBM "
        f"({100 * self.peak_bytes / self.hbm_bytes:.0f}%): {verdict}",
        f"FLOPs per device per step: analytic {self.analytic_flops_per_device:.3e}; XLA's "
        f"cost analysis {self.xla_flops_per_device:.3e} (it counts a scanned layer stack's "
        "body once, not once per layer)",
        f"collectives in the step's HLO (static count; ops in a scanned stack run once per "
        f"layer): {ops}",
        f"Pallas kernels in the step's HLO (fused attention; static count): "
        f"{self.pallas_kernels}",
        f"compiled in {self.compile_s:.1f} s",
    ]


def out_of_memory(error: Exception) -> bool:
  """Whether a compile error is XLA's: the program does not fit the device's memory."""
  return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


def topology_devices(topology: str):
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"--topology={topology!r}: libtpu cannot describe it ({e}). Names look "
                     "like v5p:2x2x2, v5e:4x4, v4:2x2x2, v6e:8x8; libtpu comes with "
                     "pip install 'vlm_jax[tpu]'.") from None
  return list(desc.devices)


def _bytes_per_device(abstract_tree) -> int:
  """Bytes of one device's shards of a tree of ShapeDtypeStructs carrying shardings."""
  total = 0
  for leaf in jax.tree.leaves(abstract_tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
  return total


def _count_collectives(hlo_text: str) -> dict:
  counts = {}
  for match in _COLLECTIVE_OP.finditer(hlo_text):
    counts[match.group(1)] = counts.get(match.group(1), 0) + 1
  return {k: counts[k] for k in COLLECTIVES if k in counts}


def compile_train_step(config, topology: str, devices=None) -> Report:
  """Compiles `config`'s train step for `topology` (its `devices`, when already described);
  raises DoesNotFit or ValueError."""
  devices = topology_devices(topology) if devices is None else devices
  kind = devices[0].device_kind
  if kind not in HBM_BYTES:
    raise ValueError(f"--topology={topology!r}: unknown HBM size for device kind {kind!r}.")
  try:
    mesh = sharding.make_mesh(config.mesh, devices)
  except ValueError as e:
    raise ValueError(f"the mesh does not divide topology {topology} ({len(devices)} devices): "
                     f"{e}") from None
  rules = sharding.rules_from_config(config)
  report = Report(topology, kind, len(devices), dict(mesh.shape), HBM_BYTES[kind])
  analytic = flops_lib.flops_per_example(config)["train"]
  report.analytic_flops_per_device = analytic * config.batch_size / len(devices)
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.batch_size % batch_shards:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                     f"{batch_shards} batch shards (data x fsdp) of mesh {report.mesh}.")
  model = registry.build(config.model)
  schedule = optimizer_lib.learning_rate_schedule(config.optimizer, config.num_train_steps)
  tx = optimizer_lib.make_optimizer(config)
  batch_spec = registry.batch_spec(config, config.batch_size)
  # Parameter shapes do not depend on the batch size: initialise from one row per shard.
  # Built before the mesh is set: eager values (the init key) cannot live on a topology's
  # devices, and the parameter shardings come from the rules, not from the traced model.
  example = {k: np.zeros((batch_shards,) + s.shape[1:], s.dtype) for k, s in batch_spec.items()}
  with nn.logical_axis_rules(rules):
    factory = state_lib.StateFactory(model, tx, config, mesh, example)
  abstract_state = factory.abstract_with_shardings()
  report.argument_bytes = _bytes_per_device(abstract_state)
  if report.argument_bytes > report.hbm_bytes:
    raise DoesNotFit(
        f"parameters and optimizer state alone need {report.argument_bytes / GIB:.1f} GiB "
        f"per device, more than the {report.hbm_bytes / GIB:.0f} GiB HBM of a {kind} "
        f"(mesh {report.mesh}); shard them over more devices (config.mesh.shape fsdp/tensor) "
        "or use a larger topology.", report)
  batch_shardings = {k: sharding.batch_sharding(mesh, rules, len(s.shape))
                     for k, s in batch_spec.items()}
  abstract_batch = {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=batch_shardings[k])
                    for k, s in batch_spec.items()}
  repl = sharding.replicated(mesh)
  rng = jax.ShapeDtypeStruct((), jax.eval_shape(jax.random.key, 0).dtype, sharding=repl)
  step = jax.jit(step_lib.make_train_step(model, tx, config, schedule),
                 in_shardings=(factory.shardings, batch_shardings, repl),
                 out_shardings=(factory.shardings, repl), donate_argnums=(0,))
  start = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    try:
      compiled = step.lower(abstract_state, abstract_batch, rng).compile()
    except Exception as e:  # pylint: disable=broad-except
      report.compile_s = time.perf_counter() - start
      if out_of_memory(e):
        raise DoesNotFit(f"XLA could not fit the step into the {report.hbm_bytes / GIB:.0f} "
                         f"GiB HBM of a {kind} (mesh {report.mesh}): "
                         f"{str(e).splitlines()[0][:500]}\n{_ADVICE}", report) from None
      raise
  report.compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  report.argument_bytes = memory.argument_size_in_bytes
  report.output_bytes = memory.output_size_in_bytes
  report.alias_bytes = memory.alias_size_in_bytes
  report.temp_bytes = memory.temp_size_in_bytes
  report.code_bytes = memory.generated_code_size_in_bytes
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  report.xla_flops_per_device = float(cost.get("flops", 0.0))
  hlo = compiled.as_text()
  report.collectives = _count_collectives(hlo)
  report.pallas_kernels = hlo.count('custom_call_target="tpu_custom_call"')
  if not report.fits:
    raise DoesNotFit("\n".join(report.lines()) + f"\nthe step does not fit: {_ADVICE}", report)
  return report
