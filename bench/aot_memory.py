"""Per-device memory of every paper-size train step on a TPU topology, compiled on this machine.

  python bench/aot_memory.py [--only simvlm_base,flamingo_80b] [--topology v5p:4x4x4]

Runs `vlm-compile --json` once per paper-size config (a subprocess each: a compile holds tens
of GiB of host memory and libtpu state) and prints one markdown row per config for
docs/performance.md. A config that does not fit is retried with `remat=full` before it is
reported as not fitting. Each compile takes minutes of CPU.
"""
import argparse
import json
import subprocess
import sys
import time

GIB = 2**30
# name: (config, mesh (data, fsdp, tensor), topology or None for --topology[, extra flags]);
# sizes and global batches are the configs' own.
CONFIGS = {
    "simvlm_base": ("configs/simvlm.py:base", "(1,-1,1)", None),
    "simvlm_large": ("configs/simvlm.py:large", "(1,-1,1)", None),
    "simvlm_huge": ("configs/simvlm.py:huge", "(1,-1,1)", None),
    "flamingo_3b": ("configs/flamingo.py:3b", "(1,-1,1)", None),
    "flamingo_9b": ("configs/flamingo.py:9b", "(1,-1,1)", None),
    "flamingo_80b": ("configs/flamingo.py:80b", "(1,-1,1)", None),
    "flamingo_of3b": ("configs/flamingo.py:of3b", "(1,-1,1)", None),
    "flamingo_of4b": ("configs/flamingo.py:of4b", "(1,-1,1)", None),
    "flamingo_of9b": ("configs/flamingo.py:of9b", "(1,-1,1)", None),
    "prismer_base": ("configs/prismer.py:base", "(1,-1,1)", None),
    "prismer_large": ("configs/prismer.py:large", "(1,-1,1)", None),
    # batch 4608 at 1120 px: 18 examples per chip on 256 chips, in 2 micro-batches of 9
    # (one pass of 18 needs 148 GiB of temporaries even with remat; 512 chips take more host
    # memory to compile than a 24 GiB machine has)
    "cogagent_18b": ("configs/cogagent.py:18b,remat=full", "(1,-1,1)", "v5p:4x8x8",
                     ("--config.grad_accum_steps=2",)),
    # batch 96: 12 examples per chip on 8 chips (64 do not divide it)
    "minigpt_v2_7b": ("configs/minigpt_v2.py:7b", "(1,-1,1)", "v5p:2x2x2"),
}


def compile_once(config: str, mesh: str, topology: str,
                 flags=()) -> tuple[int, dict | None, str]:
  cmd = ["vlm-compile", "--config", config, "--topology", topology,
         f"--config.mesh.shape={mesh}", "--json", *flags]
  print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  report = None
  for line in proc.stdout.splitlines():
    if line.startswith("{"):
      report = json.loads(line)
  lines = proc.stderr.strip().splitlines() or [""]
  message = next((l for l in reversed(lines) if "error:" in l), lines[-1])
  return proc.returncode, report, message


def row(name: str, config: str, mesh: str, topology: str, report: dict, wall: float) -> str:
  g = lambda b: f"{b / GIB:.2f} GiB"
  peak, hbm = report["peak_bytes"], report["hbm_bytes"]
  shape = tuple(report["mesh"].values())
  return (f"| {name} `{config}` | {topology}, {shape} | {g(report['argument_bytes'])} | "
          f"{g(report['temp_bytes'])} | {g(peak)} / {hbm / GIB:.0f} GiB "
          f"({100 * peak / hbm:.0f}%) | {report['analytic_flops_per_device']:.2e} | "
          f"{wall:.0f} s |")


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--only", default="", help="comma-separated names from: "
                      + ", ".join(CONFIGS))
  parser.add_argument("--topology", default="v5p:4x4x4")
  args = parser.parse_args()
  names = args.only.split(",") if args.only else list(CONFIGS)
  unknown = sorted(set(names) - set(CONFIGS))
  if unknown:
    parser.error(f"--only: unknown {unknown}; expected names from {sorted(CONFIGS)}")
  print("| config | topology, mesh (data, fsdp, tensor) | arguments | temporaries | "
        "peak / HBM | analytic FLOPs/device/step | compile (wall) |")
  print("|---|---|---|---|---|---|---|")
  for name in names:
    config, mesh, topology, *flags = CONFIGS[name]
    topology, flags = topology or args.topology, tuple(flags[0]) if flags else ()
    attempts = (config,) if "remat=" in config else (config, config + ",remat=full")
    for attempt in attempts:
      start = time.perf_counter()
      code, report, message = compile_once(attempt, mesh, topology, flags)
      wall = time.perf_counter() - start
      if code == 0 and report:
        print(row(name, " ".join((attempt,) + flags), mesh, topology, report, wall),
              flush=True)
        break
      print(f"  {attempt}: exit {code}: {message}", file=sys.stderr, flush=True)
      if code != 4:
        break
    else:
      print(f"| {name} `{config}` | {topology}, {mesh} | does not fit even with "
            f"remat=full: {message} |||||", flush=True)


if __name__ == "__main__":
  main()
