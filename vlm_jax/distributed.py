"""Multi-process JAX: initialise jax.distributed before any device use, and fail fast.

vlm-launch tells each process of a job that it is one of several through the environment:

  VLM_JAX_COORDINATOR=host:port, VLM_JAX_NUM_PROCESSES=n, VLM_JAX_PROCESS_ID=i
      explicit (`vlm-launch local --num-processes n`: CPU processes on one machine);
  VLM_JAX_DISTRIBUTED=auto
      `jax.distributed.initialize()` detects the cluster itself (Cloud TPU VM workers, SLURM
      tasks: coordinator, process count and id, and one GPU per SLURM task);
  neither
      a single process: nothing to initialise.

VLM_JAX_HEARTBEAT_TIMEOUT_S (default 60) bounds how long the survivors of a dead process
live: the coordination service stops receiving its heartbeats and terminates every other
process of the job.
"""
import functools
import itertools
import os
import sys
import traceback

import jax
from jax.experimental import multihost_utils
import numpy as np

ENV_COORDINATOR = "VLM_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "VLM_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "VLM_JAX_PROCESS_ID"
ENV_AUTO = "VLM_JAX_DISTRIBUTED"
ENV_HEARTBEAT_TIMEOUT = "VLM_JAX_HEARTBEAT_TIMEOUT_S"
DEFAULT_HEARTBEAT_TIMEOUT_S = 60

# Exit status of a process that stopped on an uncaught exception in a multi-process job.
EXIT_FAILED = 1
# How long processes wait for each other to finish compiling a program.
COMPILE_BARRIER_TIMEOUT_S = 3600


def _int_env(name: str, default=None) -> int:
  text = os.environ.get(name)
  if text is None:
    if default is None:
      raise ValueError(f"${name} must be set when ${ENV_COORDINATOR} is.")
    return default
  try:
    return int(text)
  except ValueError:
    raise ValueError(f"${name}={text!r} is not an integer.") from None


def initialize() -> bool:
  """Joins the multi-process job the environment describes; True if there is one.

  Must run before anything touches a device (jax.devices(), jax.process_index(), an array).
  """
  if jax.distributed.is_initialized():
    return True
  coordinator = os.environ.get(ENV_COORDINATOR)
  auto = os.environ.get(ENV_AUTO, "")
  if not coordinator and auto != "auto":
    if auto:
      raise ValueError(f"${ENV_AUTO}={auto!r}: the only value is 'auto'.")
    return False
  # Cross-process collectives between CPU devices (and host-side ones on accelerators).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  heartbeat = _int_env(ENV_HEARTBEAT_TIMEOUT, DEFAULT_HEARTBEAT_TIMEOUT_S)
  if coordinator:
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=_int_env(ENV_NUM_PROCESSES),
                               process_id=_int_env(ENV_PROCESS_ID),
                               heartbeat_timeout_seconds=heartbeat)
  else:
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat)
  sys.excepthook = _exit_now_on_uncaught_exception
  return True


def _exit_now_on_uncaught_exception(kind, value, tb):
  """Prints the error and exits without jax.distributed's shutdown barrier.

  A normal exit waits at that barrier for the other processes, which are blocked in a
  collective waiting for this one: the job would hang for the shutdown timeout (minutes).
  Exiting at once stops this process's heartbeats, and the coordination service then
  terminates the others within the heartbeat timeout.
  """
  traceback.print_exception(kind, value, tb)
  print(f"vlm_jax: process {jax.process_index()} of {jax.process_count()} failed; exiting "
        "without waiting for the others (they stop when its heartbeats do).", file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(EXIT_FAILED)  # pylint: disable=protected-access


def barrier(name: str) -> None:
  """Waits until every process of the job reaches the barrier `name` (unique per use)."""
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  jax_distributed.global_state.client.wait_at_barrier(name, COMPILE_BARRIER_TIMEOUT_S * 1000)


def _signature(tree):
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple(
      (np.shape(x), getattr(x, "dtype", type(x)), getattr(x, "sharding", None)) for x in leaves)


class SyncedJit:
  """A jitted function whose every new compilation waits for all processes, then runs.

  CPU collectives (gloo) set up their connections at a program's first collective and give
  up after 30 s; a process that compiles more slowly than its peers (a loaded host, a
  compilation cache hit on only some hosts) would fail the job there. The coordination
  service's barrier has no such limit. Processes run the same programs in the same order, so
  the n-th compilation of every process meets at barrier n. In a single process, it is the
  jitted function itself.
  """
  _compilations = itertools.count()

  def __init__(self, jitted, static_argnames=()):
    self._jitted, self._static = jitted, frozenset(static_argnames)
    self._compiled = {}

  def __call__(self, *args, **kwargs):
    if jax.process_count() == 1:
      return self._jitted(*args, **kwargs)
    dynamic = {k: v for k, v in kwargs.items() if k not in self._static}
    key = (_signature((args, dynamic)),
           tuple(sorted((k, v) for k, v in kwargs.items() if k in self._static)))
    compiled = self._compiled.get(key)
    if compiled is None:
      compiled = self._jitted.lower(*args, **kwargs).compile()
      barrier(f"vlm_jax_compiled_{next(SyncedJit._compilations)}")
      self._compiled[key] = compiled
    return compiled(*args, **dynamic)


def jit(fun=None, *, static_argnames=(), **jit_kwargs):
  """`jax.jit` for programs that may run in a multi-process job (see SyncedJit); usable as
  `@distributed.jit(static_argnames=...)`."""
  if fun is None:
    return functools.partial(jit, static_argnames=static_argnames, **jit_kwargs)
  return SyncedJit(jax.jit(fun, static_argnames=static_argnames, **jit_kwargs),
                   static_argnames)


def fetch(tree):
  """Host numpy copies of a tree's arrays in every process. Arrays split over other
  processes' devices are all-gathered first: a collective, so every process must call it."""
  def one(x):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
      return multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)
  return jax.tree.map(one, tree)


def sum_over_processes(counts: dict[str, int]) -> dict[str, int]:
  """{key: sum over every process} of each process's integer counts (the same keys in every
  process): a collective. Exact past 2**31 although jax gathers 32-bit integers: each count
  travels as its high and low 31-bit halves."""
  if jax.process_count() == 1:
    return dict(counts)
  values = np.asarray(list(counts.values()), np.int64)
  halves = np.stack([values >> 31, values & (2**31 - 1)]).astype(np.int32)
  gathered = np.asarray(multihost_utils.process_allgather(halves), np.int64)  # (processes, 2, n)
  totals = (gathered[:, 0] << 31) + gathered[:, 1]
  return dict(zip(counts, totals.sum(axis=0).tolist()))
