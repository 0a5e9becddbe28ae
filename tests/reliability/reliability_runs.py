"""Real `vlm-train` processes on the tiny SimVLM config, shared by the reliability tests.

Every run uses test_train's command (batch 8, a checkpoint every 5 steps, metrics every step)
with STEPS steps, so a resumed run can be compared loss for loss with the reference run.
Every wait is bounded, so a run that hangs fails its test instead of the suite.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np

from test_train import _train_command, read_losses  # noqa: F401  (tests/ is on sys.path)

STEPS = 20
RUN_TIMEOUT_S = 300


def command(workdir, *extra) -> list[str]:
  return _train_command(workdir, STEPS) + list(extra)


# Sets RLIMIT_FSIZE, then execs the real command: writes past the limit then fail with a real
# EFBIG, as writes to a full disk fail with ENOSPC. (Not preexec_fn: forking a process that
# runs JAX's threads can deadlock.) SIGXFSZ is ignored, or the kernel kills instead.
_LIMIT_FILE_SIZE = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
os.execv(sys.executable, [sys.executable] + sys.argv[2:])
"""


def run(workdir, *extra, env=None, file_size_limit=None) -> subprocess.CompletedProcess:
  cmd = command(workdir, *extra)
  if file_size_limit is not None:
    cmd = [sys.executable, "-c", _LIMIT_FILE_SIZE, str(file_size_limit)] + cmd[1:]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env)


def start(workdir, log_path) -> subprocess.Popen:
  """A run in the background; its output goes to a file (a full pipe would block it)."""
  log = open(log_path, "w")
  return subprocess.Popen(command(workdir), stdout=log, stderr=subprocess.STDOUT)


def wait_until(condition, proc, what: str, timeout_s: float = RUN_TIMEOUT_S, poll_s=0.01):
  deadline = time.time() + timeout_s
  while not condition():
    assert proc.poll() is None, f"the run ended (status {proc.returncode}) before {what}"
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(poll_s)


def last_logged_step(workdir) -> int:
  """The newest step in metrics.jsonl (0 before the first), read while the run writes it."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = [line for line in f if line.endswith("\n")]
  return json.loads(lines[-1])["step"] if lines else 0


def assert_same_losses(workdir, reference_losses, steps):
  losses = read_losses(workdir)
  missing = sorted(set(steps) - set(losses))
  assert not missing, f"steps {missing} were not logged"
  np.testing.assert_allclose([losses[s] for s in steps], [reference_losses[s] for s in steps],
                             rtol=1e-6)
