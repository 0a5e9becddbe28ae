"""`vlm-launch slurm`: an sbatch script with one task per GPU (or N CPU tasks per node).

jax.distributed.initialize() detects SLURM by itself (VLM_JAX_DISTRIBUTED=auto): the
coordinator is the first node of SLURM_STEP_NODELIST, the process id SLURM_PROCID, the count
SLURM_NTASKS, and each task keeps only GPU SLURM_LOCALID. `srun --kill-on-bad-exit=1` ends
every task when one fails, on top of the coordination service's heartbeat check.

Wall-time limits: SLURM sends the batch shell a notice signal (`--signal`, default USR1) that
long before the limit; the shell passes it on to every task as SIGTERM, each `vlm-train`
saves at the step jax's preemption sync agrees on and exits EXIT_PREEMPTED, and the shell
requeues the job (`scontrol requeue`), which resumes from that checkpoint. An admin's
`scancel --signal=TERM JOB` reaches the tasks directly and ends the same way.

Hangs: a task whose watchdog finds the loop stuck exits EXIT_HUNG after writing a report to
<workdir>/hangs/. srun reports the highest status of the job's tasks (the others are killed,
137), so the shell requeues when the status is EXIT_HUNG or a new report appeared, at most
`max_hang_requeues` times over the job's life (counted in <workdir>/hang_requeues).
"""
import dataclasses
import re
import shlex
import signal

from vlm_jax import distributed
from vlm_jax import launch
from vlm_jax import storage
from vlm_jax.train.watchdog import EXIT_HUNG, HANG_REPORTS

# vlm-train's exit status after a preemption checkpoint (cli/train.py, which library code
# does not import; tests/test_launch.py checks that they agree).
EXIT_PREEMPTED = 75

# XLA flags that matter for multi-GPU training throughput (JAX GPU performance tips and
# NVIDIA's JAX-Toolbox): overlap collectives with compute, and combine small collectives
# into large ones (thresholds in bytes).
GPU_XLA_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728",
)
GPU_ENV = (
    # Leave a little GPU memory to cuDNN/NCCL workspaces outside XLA's allocator.
    "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90",
)


def _wait_and_requeue(workdir: str, reports: str, max_hang_requeues: int) -> tuple:
  """After srun: wait for it (a trapped notice interrupts `wait`, so wait again until srun is
  gone), then requeue a job whose tasks stopped for a preemption. A notice followed by any
  other failure (a task killed before it could save) is requeued too: the rerun resumes from
  the newest complete checkpoint whatever happened. A hang is requeued a bounded number of
  times: one that recurs needs a person."""
  counter = shlex.quote(f"{workdir}/hang_requeues")
  return (
      "step=$!",
      "while true; do",
      '  wait "$step" && status=0 || status=$?',
      '  kill -0 "$step" 2>/dev/null || break',
      "done",
      f"hangs_after=$({launch.count_reports_command(reports)}) || true",
      f'if [ "$status" = {EXIT_HUNG} ] || [ "$hangs_after" != "$hangs_before" ]; then',
      f"  requeues=$(( $(cat {counter} 2>/dev/null || echo 0) + 1 ))",
      f'  echo "$requeues" > {counter}',
      f'  if [ "$requeues" -le {max_hang_requeues} ]; then',
      '    echo "vlm-launch: vlm-train hung (its report is in the workdir\'s hangs/); requeueing '
      f'job $SLURM_JOB_ID (hang requeue $requeues of at most {max_hang_requeues})"',
      '    scontrol requeue "$SLURM_JOB_ID"',
      "    exit 0",
      "  fi",
      f'  echo "vlm-launch: vlm-train hung again after {max_hang_requeues} requeue(s); not '
      'requeueing"',
      "fi",
      f'if [ "$status" = {EXIT_PREEMPTED} ] || {{ [ -n "$notice" ] && [ "$status" != 0 ]; }}; '
      "then",
      '  echo "vlm-launch: requeueing job $SLURM_JOB_ID (tasks exited $status); it resumes from '
      'its newest checkpoint"',
      '  scontrol requeue "$SLURM_JOB_ID"',
      "  exit 0",
      "fi",
      'exit "$status"',
  )


@dataclasses.dataclass(frozen=True)
class SlurmTarget:
  nodes: int
  gpus_per_node: int = 0  # GPU nodes: one task per GPU
  tasks_per_node: int = 0  # CPU nodes: this many tasks ...
  cpu_devices_per_task: int = 0  # ... with this many jax CPU devices each
  time: str = "24:00:00"
  signal: str = "USR1@300"  # SIGNAL@SECONDS before the time limit, sent to the batch shell
  job_name: str = "vlm_jax"
  partition: str = ""
  account: str = ""
  cpus_per_task: int = 8
  setup: tuple = ()  # shell lines run before srun (module load, venv activate)
  env: tuple = ()  # extra KEY=VALUE exports
  program: str = "train"  # what every task runs: vlm-train | vlm-eval
  max_hang_requeues: int = 3

  def __post_init__(self):
    if self.max_hang_requeues < 0:
      raise ValueError(f"--max-hang-requeues={self.max_hang_requeues} must be >= 0.")
    if self.nodes < 1:
      raise ValueError(f"--nodes={self.nodes} must be >= 1.")
    if self.gpus_per_node < 0 or self.cpu_devices_per_task < 0:
      raise ValueError("--gpus-per-node and --cpu-devices-per-task must be >= 1.")
    if (self.gpus_per_node > 0) == (self.cpu_devices_per_task > 0):
      raise ValueError("give either --gpus-per-node (GPU nodes) or --cpu-devices-per-task "
                       "(CPU nodes), not both or neither.")
    if self.gpus_per_node and self.tasks_per_node:
      raise ValueError(f"--tasks-per-node={self.tasks_per_node}: GPU nodes run one task per "
                       "GPU (--gpus-per-node); --tasks-per-node is for CPU nodes.")
    if self.cpu_devices_per_task and self.tasks_per_node < 1:
      raise ValueError(f"--tasks-per-node={self.tasks_per_node} must be >= 1.")
    if not re.fullmatch(r"\d+(-\d+)?(:\d+){0,2}", self.time):
      raise ValueError(f"--time={self.time!r}: expected [D-]HH:MM:SS.")
    self.notice_signal()  # validates --signal
    launch.module(self.program)  # validates --program
    for item in self.env:
      if "=" not in item:
        raise ValueError(f"--env {item!r}: expected KEY=VALUE.")

  def notice_signal(self) -> tuple[str, int]:
    """(`USR1`, 300) from `--signal USR1@300`."""
    match = re.fullmatch(r"(?:SIG)?([A-Z0-9]+)@(\d+)", self.signal)
    if not match or f"SIG{match.group(1)}" not in signal.Signals.__members__:
      raise ValueError(f"--signal={self.signal!r}: expected SIGNAL@SECONDS before the time "
                       "limit, e.g. USR1@300.")
    return match.group(1), int(match.group(2))

  def _resources(self) -> list[str]:
    if self.gpus_per_node:
      return [f"--ntasks-per-node={self.gpus_per_node}", f"--gpus-per-node={self.gpus_per_node}",
              f"--cpus-per-task={self.cpus_per_task}"]
    return [f"--ntasks-per-node={self.tasks_per_node}", f"--cpus-per-task={self.cpus_per_task}"]

  def _exports(self) -> list[str]:
    if self.gpus_per_node:
      return [f'XLA_FLAGS="${{XLA_FLAGS:-}} {" ".join(GPU_XLA_FLAGS)}"', *GPU_ENV]
    # The last --xla_force_host_platform_device_count in XLA_FLAGS wins.
    return ["JAX_PLATFORMS=cpu", 'XLA_FLAGS="${XLA_FLAGS:-} '
            f'--xla_force_host_platform_device_count={self.cpu_devices_per_task}"']


def script(t: SlurmTarget, train_args, workdir: str, repo_root: str,
           hang_reports: str = "") -> str:
  """The sbatch script: the exact text `sbatch` receives. `workdir` holds the job's output
  and hang requeue count; `hang_reports` is where vlm-train's watchdog reports hangs
  (default <workdir>/hangs; the run's gs:// workdir's when it has one)."""
  reports = hang_reports or f"{workdir}/{HANG_REPORTS}"
  notice, lead_s = t.notice_signal()
  directives = [f"--job-name={t.job_name}", f"--nodes={t.nodes}", *t._resources(),
                f"--time={t.time}"]
  directives += [f"--partition={t.partition}"] if t.partition else []
  directives += [f"--account={t.account}"] if t.account else []
  directives += ["--exclusive"] if t.gpus_per_node else []
  # `B:`: the notice goes to the batch shell only, which decides what the tasks get; a
  # requeued run appends to the same output file.
  directives += [f"--signal=B:{notice}@{lead_s}", "--requeue", "--open-mode=append",
                 f"--output={workdir}/slurm-%j.out"]
  exports = [f"{distributed.ENV_AUTO}=auto", *t._exports(), *t.env]
  srun = shlex.join(["srun", "--kill-on-bad-exit=1", "python", "-m",
                     launch.module(t.program), *train_args])
  trap = (f"trap 'notice=1; echo \"vlm-launch: preemption notice (SIG{notice}); SIGTERM to "
          f"every task\"; scancel --signal=TERM \"$SLURM_JOB_ID\" || true' {notice}")
  lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives), "set -euo pipefail",
           f"cd {shlex.quote(repo_root)}", *t.setup, *(f"export {e}" for e in exports),
           'notice=""', trap,
           f"hangs_before=$({launch.count_reports_command(reports)}) || true",
           f"{srun} &", *_wait_and_requeue(workdir, reports, t.max_hang_requeues)]
  return "\n".join(lines) + "\n"


def submit_command(script_path: str) -> list[str]:
  return ["sbatch", script_path]
