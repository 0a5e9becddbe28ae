"""XLA's persistent compilation cache for training runs: a restart (or a second run of the same
config) loads its compiled programs instead of compiling them, which is most of start-up.

config.compilation_cache_dir: "" uses $JAX_COMPILATION_CACHE_DIR when it is set, else
<workdir>/compilation_cache (shared by every host of a run when the workdir is, and kept
across restarts); "none" turns the cache off; any other value is the directory. jax caches
programs that took at least jax_persistent_cache_min_compile_time_secs (1 s) to compile.
"""
import os

import jax


def cache_dir(config, workdir: str) -> str | None:
  setting = config.compilation_cache_dir
  if setting == "none":
    return None
  if setting:
    return setting
  return os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(workdir,
                                                                      "compilation_cache")


def use(config, workdir: str) -> None:
  """Points jax at the run's cache; before the first compilation of the process."""
  jax.config.update("jax_compilation_cache_dir", cache_dir(config, workdir))
