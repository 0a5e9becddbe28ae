"""Where a run keeps JAX's persistent compilation cache.

A restarted job (a preempted pod job's rerun, a resumed run) loads its compiled train step
from the cache instead of compiling it again (docs/performance.md: the second start). The
cache lives in `config.compilation_cache_dir`:

  ""        $JAX_COMPILATION_CACHE_DIR when that variable is set (even to "": no cache), else
            <workdir>/jax_cache, so the cache travels with the run (a gs:// workdir: every
            host of a pod reads it; JAX writes entries from process 0 only, so a local
            directory would help process 0 alone)
  "none"    no persistent cache
  a path    that directory, local or gs:// (JAX reads and writes it through etils.epath)
"""
import os

import jax
from jax.experimental.compilation_cache import compilation_cache

from vlm_jax import storage

OFF = "none"
ENV = "JAX_COMPILATION_CACHE_DIR"


def directory(config, workdir: str) -> str:
  """The cache directory `config` asks for ("" = none)."""
  chosen = config.get("compilation_cache_dir", "")
  if chosen == OFF:
    return ""
  if chosen:
    return storage.abspath(chosen)
  if ENV in os.environ:
    return os.environ[ENV]
  return storage.join(storage.abspath(workdir), "jax_cache")


def configure(config, workdir: str) -> str:
  """Points JAX's cache at `directory(config, workdir)` before anything is compiled; a cache
  that an earlier compile in this process opened elsewhere is reset."""
  path = directory(config, workdir)
  if (jax.config.jax_compilation_cache_dir or "") != path:
    jax.config.update("jax_compilation_cache_dir", path or None)
    compilation_cache.reset_cache()
  return path
