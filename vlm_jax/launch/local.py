"""`vlm-launch local`: one process, or N CPU processes on this machine joined by jax.distributed.

N processes with K CPU devices each behave like N hosts of a pod (per-process data rows,
global arrays, cooperative checkpoints, process-0 logging), which is how multi-host code is
tested without a pod. Process 0's output streams to the console; every process's output
goes to <workdir>/launch_logs/process_<i>.log (eval_process_<i>.log for `--program eval`;
with a gs:// workdir: to a local directory, uploaded when the processes end).

When a process fails, the others are left to stop by themselves (the coordination service
terminates them once its heartbeats stop, as it would on a pod) for `grace_s`, then killed.
When vlm-train hung (its watchdog exited with EXIT_HUNG, or left a report in
<workdir>/hangs/ while another process's status came first), cli/launch.py restarts it.
"""
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from vlm_jax import distributed
from vlm_jax import launch
from vlm_jax import storage
from vlm_jax.train.watchdog import EXIT_HUNG, HANG_REPORTS

_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S+")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def process_envs(num_processes: int, cpu_devices: int | None, port: int,
                 heartbeat_timeout_s: int, base_env=None) -> list[dict]:
  """The environment variables each process gets on top of `base_env` (only the changes)."""
  base_env = os.environ if base_env is None else base_env
  common = {}
  if cpu_devices:
    flags = _DEVICE_COUNT_FLAG.sub("", base_env.get("XLA_FLAGS", "")).split()
    common["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count="
                                            f"{cpu_devices}"])
    common["JAX_PLATFORMS"] = "cpu"
  if num_processes == 1:
    return [common]
  common.update({distributed.ENV_COORDINATOR: f"localhost:{port}",
                 distributed.ENV_NUM_PROCESSES: str(num_processes),
                 distributed.ENV_HEARTBEAT_TIMEOUT: str(heartbeat_timeout_s)})
  return [{**common, distributed.ENV_PROCESS_ID: str(i)} for i in range(num_processes)]


def hang_reports(workdir: str) -> set:
  directory = storage.join(workdir, HANG_REPORTS)
  return set(storage.listdir(directory)) if storage.isdir(directory) else set()


def hung(status: int, reports_before: set, workdir: str) -> bool:
  """Whether a run that ended with `status` hung: its status, or a new watchdog report."""
  return status == EXIT_HUNG or bool(hang_reports(workdir) - reports_before)


def restarting_hangs(run_once, workdir: str, max_restarts: int) -> int:
  """Calls `run_once()` (-> exit status) again after each hang, at most `max_restarts` times;
  returns the last status. A hang that recurs after that needs a person."""
  if max_restarts < 0:
    raise ValueError(f"--max-hang-restarts={max_restarts} must be >= 0.")
  for restart in range(max_restarts + 1):
    reports = hang_reports(workdir)
    status = run_once()
    if not hung(status, reports, workdir):
      return status
    if restart == max_restarts:
      print(f"vlm-launch: vlm-train hung again after {max_restarts} restart(s); not restarting "
            f"it (the reports are in {storage.join(workdir, HANG_REPORTS)})", flush=True)
      return status
    print(f"vlm-launch: vlm-train hung (its report is in "
          f"{storage.join(workdir, HANG_REPORTS)}); restarting it (restart {restart + 1} of at "
          f"most {max_restarts}); it resumes from its newest checkpoint", flush=True)
  return status


def _argv(program: str, args) -> list[str]:
  return [sys.executable, "-m", launch.module(program), *args]


def commands(args, envs, program: str = "train") -> list[str]:
  """One shell line per process: exactly what runs (the dry-run output)."""
  argv = _argv(program, args)
  return [" ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())) + " " +
          shlex.join(argv) for env in envs]


def _stream(pipe, log_file, console):
  for line in iter(pipe.readline, b""):
    log_file.write(line)
    log_file.flush()
    console.write(line.decode(errors="replace"))
    console.flush()


def _exit_status(code: int) -> int:
  return 128 - code if code < 0 else code  # killed by signal s -> 128 + s, as shells report


def run(args, envs, log_dir: str, grace_s: float, program: str = "train") -> int:
  """Runs the processes; returns 0, or the exit status of the first one that failed."""
  upload_to = log_dir if storage.is_gcs(log_dir) else None
  if upload_to:
    log_dir = tempfile.mkdtemp(prefix="vlm_jax_launch_logs_")
  os.makedirs(log_dir, exist_ok=True)
  argv = _argv(program, args)
  procs, logs, threads = [], [], []
  prefix = "" if program == "train" else f"{program}_"  # a later vlm-eval keeps train's logs
  for i, env in enumerate(envs):
    # Appended to: a restarted or resumed run keeps the earlier attempts' logs.
    log = open(os.path.join(log_dir, f"{prefix}process_{i}.log"), "ab")
    logs.append(log)
    stdout = subprocess.PIPE if i == 0 else log
    procs.append(subprocess.Popen(argv, env={**os.environ, **env}, stdout=stdout,
                                  stderr=subprocess.STDOUT))
    print(f"vlm-launch: process {i} pid {procs[-1].pid}, log {log.name}", flush=True)
  threads.append(threading.Thread(target=_stream, args=(procs[0].stdout, logs[0], sys.stdout),
                                  daemon=True))
  threads[0].start()
  first_failure = None
  try:
    while any(p.poll() is None for p in procs):
      time.sleep(0.2)
      if first_failure is None:
        failed = [(i, p) for i, p in enumerate(procs) if p.poll() not in (None, 0)]
        if failed:
          first_failure = (failed[0][0], failed[0][1].returncode, time.monotonic())
          print(f"vlm-launch: process {failed[0][0]} failed with status "
                f"{_exit_status(failed[0][1].returncode)}; waiting up to {grace_s:.0f} s for "
                "the others to stop", flush=True)
      elif time.monotonic() - first_failure[2] > grace_s:
        _kill_all(procs)
  except KeyboardInterrupt:
    _kill_all(procs)
    raise
  finally:
    threads[0].join(timeout=10)
    for log in logs:
      log.close()
    if upload_to:
      storage.put_tree(log_dir, upload_to)
      print(f"vlm-launch: logs copied to {upload_to}", flush=True)
  if first_failure is None:
    return 0
  for i, p in enumerate(procs):
    print(f"vlm-launch: process {i} exited with status {_exit_status(p.returncode)}",
          flush=True)
  return _exit_status(first_failure[1])


def _kill_all(procs):
  for i, p in enumerate(procs):
    if p.poll() is None:
      print(f"vlm-launch: process {i} still running: killing it", flush=True)
      p.send_signal(signal.SIGTERM)
  deadline = time.monotonic() + 10
  for p in procs:
    try:
      p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
