"""Where a config's train step spends its time: a per-op breakdown from a jax.profiler trace.

  python bench/step_profile.py configs/flamingo.py:bench,scan=False [--steps 5] [--top 25]

Compiles the step as bench/train_step.py does (the config's own first pipeline batch), traces
`--steps` steps, and joins each XLA:CPU thunk in the trace to its instruction in the
compiled HLO. Every op's time is its minimum over the traced steps (each op runs once per
step, or once per layer inside a scanned loop): on a shared machine the minimum is close to
what the op costs alone, while medians and sums carry the other load. Printed:

  kind   dot (YNN/Eigen matmuls, with achieved GFLOP/s), transposing copy (a fusion or copy
         whose output layout differs from its input's), reduce / element-wise fusion,
         dynamic-slice / dynamic-update-slice (a scanned stack reading / writing its
         stacked weights and residuals), runtime (thunk-executor events outside the HLO)
  block  the same split by forward / backward and by the op's model path (metadata)
  top    the most expensive non-dot ops

`--hlo FILE` also writes the optimised HLO text. The trace and the join are plain files:
nothing here needs TensorBoard.
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

import jax

import train_step
from vlm_jax import config as config_lib

RUNTIME_PREFIXES = ("Thread", "$", "Common", "Pjit", "Py", "Parse", "Handle", "Alloc", "Wait",
                    "ThunkExecutor", "end:", "SlinkyThreadPool", "MutexLock")


def trace_op_minimums(step: train_step.CompiledStep, steps: int) -> dict:
  """{thunk name: (per-step minimum microseconds, calls per step)} from a profiler trace."""
  step.run(2)  # warm-up
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    step.run(steps)
    jax.profiler.stop_trace()
    path = sorted(glob.glob(os.path.join(trace_dir, "plugins/profile/*/*.trace.json.gz")))[-1]
    with gzip.open(path) as f:
      events = json.load(f)["traceEvents"]
  durations = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and not e["name"].startswith(RUNTIME_PREFIXES):
      durations[e["name"]].append(e["dur"])
  out = {}
  for name, times in durations.items():
    calls = max(1, len(times) // steps)
    out[name] = (sum(sorted(times)[:calls]), calls)
  return out


def hlo_instructions(hlo: str) -> dict:
  """{instruction name: (line, called computation text)} for non-fused computations."""
  bodies = {m.group(1): m.group(2)
            for m in re.finditer(r"^%([\w.-]+) .*?\{\n(.*?)\n\}", hlo, re.M | re.S)}
  out = {}
  for line in hlo.splitlines():
    m = re.match(r"\s+(?:ROOT )?%([\w.-]+) = ", line)
    if m:
      called = re.search(r"calls=%([\w.-]+)", line)
      out.setdefault(m.group(1), (line, bodies.get(called.group(1), "") if called else ""))
  return out


def _dims(text: str) -> list[int]:
  return [int(d) for d in text.split(",") if d]


def dot_flops(line: str, body: str, shapes: dict) -> int:
  """2 * output elements * contracted size of the dot in `line` or in its fused body."""
  for text in (line, *body.splitlines()):
    m = re.search(r"= \w+\[([\d,]*)\]\S* dot\(%([\w.-]+), %[\w.-]+\).*?lhs_contracting_dims="
                  r"\{([\d,]*)\}", text)
    if m and m.group(2) in shapes:
      contracted = 1
      for axis in _dims(m.group(3)):
        contracted *= shapes[m.group(2)][axis]
      out = 1
      for d in _dims(m.group(1)):
        out *= d
      return 2 * out * contracted
  return 0


def kind_of(opcode: str, line: str, body: str) -> str:
  if "__ynn_fusion" in line or opcode in ("dot", "convolution") or \
      (opcode == "fusion" and " dot(" in body):
    return "dot"
  if opcode in ("transpose", "copy") or re.search(r" (transpose|copy)\(", body):
    return "transposing copy"
  if "dynamic-update-slice" in body or opcode == "dynamic-update-slice":
    return "dynamic-update-slice"
  if "dynamic-slice" in body or opcode == "dynamic-slice":
    return "dynamic-slice"
  if " reduce(" in body:
    return "reduce fusion"
  return "element-wise fusion" if opcode == "fusion" else opcode


def breakdown(hlo: str, ops: dict) -> list[dict]:
  instructions = hlo_instructions(hlo)
  shapes = {m.group(1): _dims(m.group(2))  # instruction names are unique in the module
            for m in re.finditer(r"%([\w.-]+) = \w+\[([\d,]*)\]", hlo)}
  rows = []
  for name, (micros, calls) in ops.items():
    if name not in instructions:
      rows.append({"name": name, "ms": micros / 1e3, "kind": "runtime", "phase": "-",
                   "path": "", "flops": 0})
      continue
    line, body = instructions[name]
    opcode = re.match(r"\s+(?:ROOT )?%[\w.-]+ = \S+ ([\w-]+)\(", line)
    opcode = opcode.group(1) if opcode else "?"
    if opcode in ("while", "conditional", "call"):
      continue  # containers: their bodies' ops are counted themselves
    meta = re.search(r'op_name="([^"]*)"', line)
    meta = meta.group(1) if meta else ""
    path = re.sub(r"jit\([\w]+\)/|(transpose\()?jvp\([\w]+\)\)?/", "", meta)
    path = "/".join(p for p in path.split("/") if not p.startswith(
        ("while", "body", "closed_call", "checkpoint", "cond")))
    kind = kind_of(opcode, line, body)
    flops = dot_flops(line, body, shapes) * calls if kind == "dot" else 0
    rows.append({"name": name, "ms": micros / 1e3, "kind": kind, "flops": flops,
                 "phase": "backward" if "transpose(jvp" in meta else "forward", "path": path})
  return rows


def report(rows: list[dict], top: int) -> None:
  total = sum(r["ms"] for r in rows)
  print(f"sum of per-op minimums: {total:.0f} ms per step")
  by_kind = collections.defaultdict(lambda: [0.0, 0])
  for r in rows:
    by_kind[r["kind"]][0] += r["ms"]
    by_kind[r["kind"]][1] += r["flops"]
  print("\nkind                      ms/step   share   (dots: GFLOP, GFLOP/s)")
  for kind, (ms, flops) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
    if ms < 0.05:
      continue
    extra = f"   {flops / 1e9:.1f}, {flops / ms / 1e6:.1f}" if flops else ""
    print(f"{kind:24s} {ms:8.1f} {100 * ms / total:6.1f}%{extra}")
  by_block = collections.Counter()
  for r in rows:
    block = "/".join(r["path"].split("/")[:3])
    by_block[(r["phase"], "dot" if r["kind"] == "dot" else "other", block)] += r["ms"]
  print(f"\ntop {top} (phase, dot or other, model path):")
  for (phase, kind, block), ms in by_block.most_common(top):
    print(f"{ms:8.1f} ms  {phase:8s} {kind:5s} {block}")
  print(f"\ntop {top} non-dot ops:")
  for r in sorted((r for r in rows if r["kind"] != "dot"), key=lambda r: -r["ms"])[:top]:
    print(f"{r['ms']:7.1f} ms  {r['kind']:20s} {r['phase']:8s} {r['name']:32s} {r['path'][-70:]}")


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("config", help="path.py:arg")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--hlo", help="write the optimised HLO text here")
  args = parser.parse_args()
  config = config_lib.load_config(args.config, ())
  step = train_step.compile_step(config, train_step.pipeline_batch(config))
  hlo = step.compiled.as_text()
  if args.hlo:
    with open(args.hlo, "w") as f:
      f.write(hlo)
  report(breakdown(hlo, trace_op_minimums(step, args.steps)), args.top)


if __name__ == "__main__":
  main()
