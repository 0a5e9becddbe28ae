"""Per-device memory of every paper-size train step on a TPU topology, compiled on this machine,
with XLA attention and with the Pallas splash kernel (config.model.attention_impl).

  python bench/aot_memory.py [--only simvlm_base,flamingo_80b] [--topology v5p:4x4x4]
                             [--attention xla,splash]

Runs `vlm-compile --json` once per paper-size config and attention implementation (a
subprocess each: a compile holds tens of GiB of host memory and libtpu state) and prints one
markdown row per pair for docs/performance.md. Each pair climbs a ladder of memory settings
and reports the first that fits: no remat and no micro-batches, then `remat=full`, then
`remat=full` with the config's micro-batches. XLA starts at the rung its config is known to
need (below); splash starts at the bottom, so its rows show which configs the kernel frees
from remat or gradient accumulation. Each compile takes minutes of CPU.
"""
import argparse
import json
import subprocess
import sys
import time

GIB = 2**30
# name: (config, mesh (data, fsdp, tensor), topology or None for --topology, micro-batch
# flags, the rung XLA needs: 0 none, 1 remat=full, 2 remat=full + micro-batches); sizes and
# global batches are the configs' own.
CONFIGS = {
    "simvlm_base": ("configs/simvlm.py:base", "(1,-1,1)", None, (), 0),
    "simvlm_large": ("configs/simvlm.py:large", "(1,-1,1)", None, (), 0),
    "simvlm_huge": ("configs/simvlm.py:huge", "(1,-1,1)", None, (), 1),
    "flamingo_3b": ("configs/flamingo.py:3b", "(1,-1,1)", None, (), 0),
    "flamingo_9b": ("configs/flamingo.py:9b", "(1,-1,1)", None, (), 0),
    "flamingo_80b": ("configs/flamingo.py:80b", "(1,-1,1)", None, (), 0),
    "flamingo_of3b": ("configs/flamingo.py:of3b", "(1,-1,1)", None, (), 0),
    "flamingo_of4b": ("configs/flamingo.py:of4b", "(1,-1,1)", None, (), 0),
    "flamingo_of9b": ("configs/flamingo.py:of9b", "(1,-1,1)", None, (), 0),
    "prismer_base": ("configs/prismer.py:base", "(1,-1,1)", None, (), 0),
    "prismer_large": ("configs/prismer.py:large", "(1,-1,1)", None, (), 0),
    # batch 4608 at 1120 px: 18 examples per chip on 256 chips, in 2 micro-batches of 9
    # (with XLA attention one pass of 18 needs 148 GiB of temporaries even with remat; 512
    # chips take more host memory to compile than a 24 GiB machine has)
    "cogagent_18b": ("configs/cogagent.py:18b", "(1,-1,1)", "v5p:4x8x8",
                     ("--config.grad_accum_steps=2",), 2),
    # batch 96: 12 examples per chip on 8 chips (64 do not divide it)
    "minigpt_v2_7b": ("configs/minigpt_v2.py:7b", "(1,-1,1)", "v5p:2x2x2", (), 0),
}
RUNGS = ("none", "remat=full", "remat=full + micro-batches")


def ladder(config: str, micro_batches: tuple, start: int):
  """(rung, config, flags) from `start` up: the memory settings in order of cost."""
  rungs = [(config, ()), (config + ",remat=full", ()), (config + ",remat=full", micro_batches)]
  if not micro_batches:
    rungs = rungs[:2]
  return [(i, c, f) for i, (c, f) in enumerate(rungs) if i >= start]


def compile_once(config: str, mesh: str, topology: str, attention: str,
                 flags=()) -> tuple[int, dict | None, str]:
  cmd = ["vlm-compile", "--config", config, "--topology", topology,
         f"--config.mesh.shape={mesh}", f"--config.model.attention_impl={attention}", "--json",
         *flags]
  print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  report = None
  for line in proc.stdout.splitlines():
    if line.startswith("{"):
      report = json.loads(line)
  lines = proc.stderr.strip().splitlines() or [""]
  message = next((l for l in reversed(lines) if "error:" in l), lines[-1])
  return proc.returncode, report, message


def row(name: str, attention: str, rung: int, topology: str, report: dict, wall: float) -> str:
  g = lambda b: f"{b / GIB:.2f} GiB"
  peak, hbm = report["peak_bytes"], report["hbm_bytes"]
  shape = tuple(report["mesh"].values())
  return (f"| {name} | {attention} | {RUNGS[rung]} | {topology}, {shape} | "
          f"{g(report['argument_bytes'])} | {g(report['temp_bytes'])} | {g(peak)} / "
          f"{hbm / GIB:.0f} GiB ({100 * peak / hbm:.0f}%) | {report['pallas_kernels']} | "
          f"{wall:.0f} s |")


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--only", default="", help="comma-separated names from: "
                      + ", ".join(CONFIGS))
  parser.add_argument("--topology", default="v5p:4x4x4")
  parser.add_argument("--attention", default="xla,splash",
                      help="comma-separated config.model.attention_impl values")
  args = parser.parse_args()
  names = args.only.split(",") if args.only else list(CONFIGS)
  unknown = sorted(set(names) - set(CONFIGS))
  if unknown:
    parser.error(f"--only: unknown {unknown}; expected names from {sorted(CONFIGS)}")
  print("| config | attention | remat / micro-batches | topology, mesh (data, fsdp, tensor) | "
        "arguments | temporaries | peak / HBM | Pallas kernels | compile (wall) |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name in names:
    config, mesh, topology, micro_batches, xla_rung = CONFIGS[name]
    topology = topology or args.topology
    for attention in args.attention.split(","):
      start = xla_rung if attention == "xla" else 0
      for rung, attempt, flags in ladder(config, micro_batches, start):
        began = time.perf_counter()
        code, report, message = compile_once(attempt, mesh, topology, attention, flags)
        wall = time.perf_counter() - began
        if code == 0 and report:
          print(row(name, attention, rung, topology, report, wall), flush=True)
          break
        print(f"  {attempt} {' '.join(flags)} ({attention}): exit {code}: {message}",
              file=sys.stderr, flush=True)
        if code != 4:
          print(f"| {name} | {attention} | {RUNGS[rung]} | {topology}, {mesh} | "
                f"failed: {message} ||||", flush=True)
          break
      else:
        print(f"| {name} | {attention} | does not fit at any rung | {topology}, {mesh} | "
              f"{message} ||||", flush=True)


if __name__ == "__main__":
  main()
