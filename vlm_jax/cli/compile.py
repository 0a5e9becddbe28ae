"""vlm-compile --config configs/<family>.py:<size> --topology v5p:4x4x4 [--config.a.b=v ...]

Compiles the train step ahead of time for a TPU topology on this machine (CPU is enough; needs
libtpu: pip install 'vlm_jax[tpu]') with the config's mesh and logical-axis rules, and prints
per-device memory (arguments, temporaries, outputs), FLOPs and the collective ops.

--search tries remat policies, micro-batch counts and mesh splits (best first, stopping at
the first that fits; vlm_jax/fit_search.py), prints a table and the best fitting setting as
the overrides to use.

Exit status: 0 it fits (--search: a setting fits); 4 it does not fit the chip's HBM (--search:
nothing does); 2 a bad config, topology or mesh.
"""
import argparse
import dataclasses
import json
import os
import sys

from vlm_jax.cli import common

EXIT_DOES_NOT_FIT = 4


def main(argv=None):
  parser = argparse.ArgumentParser(prog="vlm-compile", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--topology", required=True, help="e.g. v5p:4x4x4, v5e:16x16, v4:2x2x2")
  parser.add_argument("--json", action="store_true", help="also print the report as JSON")
  parser.add_argument("--search", action="store_true",
                      help="search remat x micro-batches x mesh splits for the best that fits")
  parser.add_argument("--remat", default="none,dots,full", help="--search: policies to try")
  parser.add_argument("--micro-batches", default="1,2,4,8",
                      help="--search: config.grad_accum_steps values to try")
  parser.add_argument("--meshes", default="",
                      help="--search: mesh splits to try, e.g. '(1,4,1) (4,1,1)' (default: "
                      "every data x fsdp x tensor split of the topology)")
  config, args = common.parse_with_config(parser, argv)
  # libtpu takes a machine-wide lock when it loads; describing a topology needs no TPU, so
  # let it load beside other JAX processes (a training run, parallel tests).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if args.search:
    _search(parser, config, args)
    return
  from vlm_jax import aot  # pylint: disable=g-import-not-at-top

  try:
    report = aot.compile_train_step(config, args.topology)
  except aot.DoesNotFit as e:
    print(f"vlm-compile: error: does not fit: {e}", file=sys.stderr)
    sys.exit(EXIT_DOES_NOT_FIT)
  except ValueError as e:
    parser.error(str(e))
  print("\n".join(report.lines()))
  if args.json:
    print(json.dumps({**dataclasses.asdict(report), "peak_bytes": report.peak_bytes,
                      "fits": report.fits}))


def _search(parser, config, args):
  from vlm_jax import fit_search  # pylint: disable=g-import-not-at-top
  try:
    remats = tuple(filter(None, args.remat.split(",")))
    counts = tuple(int(v) for v in args.micro_batches.split(",") if v)
    meshes = fit_search.parse_meshes(args.meshes) if args.meshes else None
    print(fit_search.HEADER, flush=True)
    best, tried = fit_search.search(config, args.topology, remats, counts, meshes,
                                    log=lambda line: print(line, flush=True))
  except ValueError as e:
    parser.error(str(e))
  print("\n".join(fit_search.summary(best, tried, args.topology)))
  if args.json:
    print(json.dumps({"best": best.row() if best else None, "tried": [c.row() for c in tried],
                      "overrides": best.overrides() if best else None}))
  if best is None:
    sys.exit(EXIT_DOES_NOT_FIT)


if __name__ == "__main__":
  main()
