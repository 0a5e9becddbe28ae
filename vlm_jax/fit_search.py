"""Which setting of a config fits a TPU topology, and which is cheapest: `vlm-compile --search`.

Candidates vary three things: the remat policy (config.model.remat_policy), micro-batches
(config.grad_accum_steps) and the mesh split of the topology's devices (config.mesh.shape as
data x fsdp x tensor). Each is compiled ahead of time (aot.compile_train_step) and checked
against the chip's HBM.

Ranking (the order candidates are tried in): the estimated step time first, the analytic
model FLOPs per device times the remat recompute factor (a full remat runs each layer's
forward twice: 8N instead of 6N FLOPs, x4/3; `dots` keeps the matmuls and recomputes only
cheap element-wise work, x1) over the chip's peak; then fewer micro-batches (each one
re-gathers fsdp-sharded parameters and runs smaller matmuls); then `none` before `dots`; then
the mesh with the least communication (tensor parallelism costs collectives in every layer,
fsdp a gather per layer, data parallelism one gradient all-reduce). The estimate ignores
communication and memory bandwidth: it separates the remat tiers, the other keys order
settings it cannot separate.

Pruning: candidates are tried best-first, all mesh splits at one (remat, micro-batches) rung
before the next rung, and the search stops at the first that fits, which is then the best
(every better candidate was tried and did not fit). A mesh split whose parameters and
optimizer state alone exceed HBM is dropped at once without compiling (no remat or
micro-batch count changes them), and micro-batch counts that do not divide the batch evenly
over the mesh's batch shards are skipped.
"""
import dataclasses
import math
import re

from vlm_jax import aot
from vlm_jax.train import metrics as metrics_lib

REMAT_RECOMPUTE = {"none": 1.0, "dots": 1.0, "full": 4 / 3}
REMAT_TIERS = (("none", "dots"), ("full",))  # same estimated time within a tier
# XLA TPU's out-of-memory message: "... required for HLO temporaries (19.51G) exceeds ..."
_XLA_TEMPORARIES = re.compile(r"temporaries \(([\d.]+)G\)")


@dataclasses.dataclass
class Candidate:
  remat: str
  micro_batches: int
  mesh: tuple  # (data, fsdp, tensor)
  verdict: str = "not tried"  # fits | does not fit | params do not fit | error: ...
  report: aot.Report | None = None
  step_s: float = float("nan")  # estimated

  def overrides(self) -> list[str]:
    return [f"--config.model.remat_policy={self.remat}",
            f"--config.grad_accum_steps={self.micro_batches}",
            f"--config.mesh.shape='({self.mesh[0]},{self.mesh[1]},{self.mesh[2]})'"]

  def row(self) -> dict:
    r = self.report
    return {"remat": self.remat, "micro_batches": self.micro_batches, "mesh": list(self.mesh),
            "verdict": self.verdict, "peak_bytes": r.peak_bytes if r else None,
            "hbm_bytes": r.hbm_bytes if r else None,
            "xla_flops_per_device": r.xla_flops_per_device if r else None,
            "analytic_flops_per_device": r.analytic_flops_per_device if r else None,
            "estimated_step_s": self.step_s, "compile_s": r.compile_s if r else None}


def mesh_splits(num_devices: int, batch_size: int) -> list[tuple]:
  """(data, fsdp, tensor) with product num_devices whose batch shards divide the batch,
  least communication first: less tensor, then less fsdp."""
  splits = []
  for tensor in _divisors(num_devices):
    for fsdp in _divisors(num_devices // tensor):
      data = num_devices // tensor // fsdp
      if batch_size % (data * fsdp) == 0:
        splits.append((data, fsdp, tensor))
  return sorted(splits, key=lambda m: (m[2], m[1]))


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def rungs(remats, micro_batches) -> list[tuple]:
  """(remat, micro-batches) in ranking order: remat tier, then micro-batches, then policy."""
  order = []
  for tier in REMAT_TIERS:
    for count in sorted(micro_batches):
      order += [(r, count) for r in tier if r in remats]
  return order


def _with(config, c: Candidate):
  config = config.copy_and_resolve_references()
  config.model.remat_policy = c.remat
  config.grad_accum_steps = c.micro_batches
  config.mesh.shape = c.mesh
  return config


def search(config, topology: str, remats=("none", "dots", "full"), micro_batches=(1, 2, 4, 8),
           meshes=None, log=print) -> tuple[Candidate | None, list[Candidate]]:
  """(the best fitting candidate or None, every candidate tried, in order)."""
  for remat in remats:
    if remat not in REMAT_RECOMPUTE:
      raise ValueError(f"--remat {remat!r}: expected some of {sorted(REMAT_RECOMPUTE)}.")
  devices = aot.topology_devices(topology)
  n = len(devices)
  if meshes is None:
    meshes = mesh_splits(n, config.batch_size)
  for mesh in meshes:
    if len(mesh) != 3 or math.prod(mesh) != n:
      raise ValueError(f"--meshes {mesh}: a (data, fsdp, tensor) split of the {n} devices of "
                       f"{topology}.")
  known = metrics_lib.accelerator_peak(devices[0].device_kind)
  peak = known[0] if known else float("nan")
  alive, tried = list(meshes), []
  for remat, count in rungs(remats, micro_batches):
    for mesh in list(alive):
      if config.batch_size % (count * mesh[0] * mesh[1]):
        continue  # a micro-batch would not split evenly over the batch shards
      c = Candidate(remat, count, tuple(mesh))
      tried.append(c)
      _try(config, topology, devices, c, peak)
      log(_line(c))
      if c.verdict == "fits":
        return c, tried
      if c.verdict == "params do not fit":
        alive.remove(mesh)
  return None, tried


def _try(config, topology, devices, c: Candidate, peak: float):
  try:
    c.report = aot.compile_train_step(_with(config, c), topology, devices)
    c.verdict = "fits"
  except aot.DoesNotFit as e:
    c.report = e.report
    c.verdict = "does not fit" if e.report.temp_bytes or e.report.compile_s else \
        "params do not fit"
    if not c.report.temp_bytes:  # XLA gave up: its message says what the temporaries need
      needed = _XLA_TEMPORARIES.search(str(e))
      c.report.temp_bytes = int(float(needed[1]) * aot.GIB) if needed else 0
  except Exception as e:  # pylint: disable=broad-except
    c.verdict = f"error: {' '.join(str(e).split())[:200]}"
  if c.report is not None:
    c.step_s = c.report.analytic_flops_per_device * REMAT_RECOMPUTE[c.remat] / peak


def _gib(b) -> str:
  return f"{b / aot.GIB:.2f}" if b else "-"


def _line(c: Candidate) -> str:
  r = c.report
  peak = _gib(r.peak_bytes) if r and (r.temp_bytes or c.verdict == "params do not fit") else "-"
  mesh = "x".join(map(str, c.mesh))
  return (f"{c.remat:5s} {c.micro_batches:5d} {mesh:>9s} {c.verdict[:40]:40s} {peak:>10s} "
          f"{(f'{r.xla_flops_per_device:.3e}' if r and r.xla_flops_per_device else '-'):>10s} "
          f"{(f'{1e3 * c.step_s:.1f}' if c.step_s == c.step_s else '-'):>9s} "
          f"{(f'{r.compile_s:.0f}' if r and r.compile_s else '-'):>7s}")


HEADER = (f"{'remat':5s} {'micro':>5s} {'mesh dfs':>9s} {'verdict':40s} {'peak GiB':>10s} "
          f"{'XLA FLOPs':>10s} {'est. ms':>9s} {'compile':>7s}")


def summary(best: Candidate | None, tried: list[Candidate], topology: str) -> list[str]:
  hbm = next((c.report.hbm_bytes for c in tried if c.report), 0)
  lines = [f"fit search on {topology} ({_gib(hbm)} GiB HBM per device): {len(tried)} "
           f"setting(s) tried, best first; the search stops at the first that fits.", HEADER]
  lines += [_line(c) for c in tried]
  if best is None:
    lines.append("nothing fits: use a larger topology, a smaller batch or more micro-batches "
                 "(--micro-batches), or a smaller model.")
  else:
    lines.append("best fitting setting: " + " ".join(best.overrides()))
  return lines


def parse_meshes(text: str) -> list[tuple]:
  """'(1,4,1) (4,1,1)' or '1x4x1,4x1x1' -> [(1, 4, 1), (4, 1, 1)]."""
  found = re.findall(r"(\d+)\s*[,x]\s*(\d+)\s*[,x]\s*(\d+)", text)
  if not found:
    raise ValueError(f"--meshes {text!r}: expected splits like '(1,4,1) (4,1,1)'.")
  return [tuple(int(v) for v in m) for m in found]

