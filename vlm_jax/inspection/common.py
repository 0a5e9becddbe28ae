"""Finding the repository, its families and their configs by name, plain-text tables."""
import glob
import os

import ml_collections

import vlm_jax
from vlm_jax import config as config_lib


def repo_dir() -> str:
  """The checkout holding configs/: $VLM_JAX_REPO_DIR, else the one vlm_jax was imported from."""
  path = os.environ.get("VLM_JAX_REPO_DIR") or os.path.dirname(
      os.path.dirname(os.path.abspath(vlm_jax.__file__)))
  if not os.path.isdir(os.path.join(path, "configs")):
    raise FileNotFoundError(f"{path} has no configs/ directory; set VLM_JAX_REPO_DIR to the "
                            "vlm_jax checkout (configs are not part of the installed package).")
  return path


def families() -> list[str]:
  """The families with a config in the repository's configs/ (one file each)."""
  return sorted(os.path.basename(p)[:-3] for p in glob.glob(
      os.path.join(repo_dir(), "configs", "*.py")))


def family_config(family: str, size: str = "tiny", overrides=()) -> ml_collections.ConfigDict:
  """configs/<family>.py:<size> with ('a.b', 'value') overrides."""
  return config_lib.load_config(os.path.join(repo_dir(), "configs", f"{family}.py:{size}"),
                                overrides)


def env_list(name: str, default: str) -> list:
  """A comma-separated notebook parameter from the environment (papermill-free)."""
  return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def text_table(rows, headers) -> str:
  """Fixed-width table; numbers right-aligned with thousands separators."""
  def fmt(value):
    return f"{value:,}" if isinstance(value, int) else str(value)
  cells = [[fmt(v) for v in row] for row in rows]
  widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
  numeric = [all(isinstance(row[i], (int, float)) for row in rows) for i in range(len(headers))]

  def line(values):
    return "  ".join(v.rjust(w) if num else v.ljust(w)
                     for v, w, num in zip(values, widths, numeric))
  return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])
