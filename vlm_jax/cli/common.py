"""Command-line plumbing shared by the console scripts."""
import sys

from vlm_jax import config as config_lib


def parse_with_config(parser, argv=None):
  """(config, args): `--config path.py:arg` plus `--config.a.b=v` overrides, then the rest.

  Config errors (unknown key, wrong type, missing file) exit with status 2 and a message that
  names the field.
  """
  argv = sys.argv[1:] if argv is None else argv
  try:
    spec, overrides, rest = config_lib.parse_config_args(argv)
    args = parser.parse_args(rest)
    if spec is None:
      parser.error("--config path/to/config.py:arg is required")
    return config_lib.load_config(spec, overrides), args
  except config_lib.ConfigError as e:
    parser.error(str(e))
