"""vlm-compile --config configs/<family>.py:<size> --topology v5p:4x4x4 [--config.a.b=v ...]

Compiles the train step ahead of time for a TPU topology on this machine (CPU is enough; needs
libtpu: pip install 'vlm_jax[tpu]') with the config's mesh and logical-axis rules, and prints
per-device memory (arguments, temporaries, outputs), FLOPs and the collective ops.

Exit status: 0 it fits; 4 it does not fit the chip's HBM; 2 a bad config, topology or mesh.
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
  config, args = common.parse_with_config(parser, argv)
  # libtpu takes a machine-wide lock when it loads; describing a topology needs no TPU, so
  # let it load beside other JAX processes (a training run, parallel tests).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
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


if __name__ == "__main__":
  main()
