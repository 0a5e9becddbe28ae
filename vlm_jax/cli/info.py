"""vlm-info --config configs/<family>.py:<size> [--num-devices N] [--config.a.b=value ...]

Prints, as JSON: parameter counts (total, trainable, frozen; per top-level module), FLOPs per
example, the mesh, and each parameter's logical axes and mesh sharding. Uses jax.eval_shape
only, so paper-size configs run on a laptop CPU in seconds.
"""
import argparse
import json

from vlm_jax.cli import common


def main(argv=None):
  parser = argparse.ArgumentParser(prog="vlm-info", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num-devices", type=int, default=None,
                      help="devices to resolve the mesh for (default: this machine's)")
  parser.add_argument("--no-shardings", action="store_true", help="omit per-parameter shardings")
  config, args = common.parse_with_config(parser, argv)
  import jax
  from vlm_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  from vlm_jax.inspection import model  # pylint: disable=g-import-not-at-top
  try:
    info = model.describe(config, args.num_devices or jax.device_count())
  except (ConfigError, ValueError) as e:
    parser.error(str(e))
  if args.no_shardings:
    del info["shardings"]
  print(json.dumps(info, indent=2))


if __name__ == "__main__":
  main()
