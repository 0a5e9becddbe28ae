"""`vlm-launch slurm`: an sbatch script with one task per GPU, submitted with sbatch.

jax.distributed.initialize() detects SLURM by itself (VLM_JAX_DISTRIBUTED=auto): the
coordinator is the first node of SLURM_STEP_NODELIST, the process id SLURM_PROCID, the count
SLURM_NTASKS, and each task keeps only GPU SLURM_LOCALID. `srun --kill-on-bad-exit=1` ends
every task when one fails, on top of the coordination service's heartbeat check.
"""
import dataclasses
import re
import shlex

from vlm_jax import distributed

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


@dataclasses.dataclass(frozen=True)
class SlurmTarget:
  nodes: int
  gpus_per_node: int
  time: str = "24:00:00"
  job_name: str = "vlm_jax"
  partition: str = ""
  account: str = ""
  cpus_per_task: int = 8
  setup: tuple = ()  # shell lines run before srun (module load, venv activate)
  env: tuple = ()  # extra KEY=VALUE exports

  def __post_init__(self):
    if self.nodes < 1 or self.gpus_per_node < 1:
      raise ValueError(f"--nodes={self.nodes} and --gpus-per-node={self.gpus_per_node} must be "
                       ">= 1.")
    if not re.fullmatch(r"\d+(-\d+)?(:\d+){0,2}", self.time):
      raise ValueError(f"--time={self.time!r}: expected [D-]HH:MM:SS.")
    for item in self.env:
      if "=" not in item:
        raise ValueError(f"--env {item!r}: expected KEY=VALUE.")


def script(t: SlurmTarget, train_args, workdir: str, repo_root: str) -> str:
  """The sbatch script: the exact text `sbatch` receives."""
  directives = [f"--job-name={t.job_name}", f"--nodes={t.nodes}",
                f"--ntasks-per-node={t.gpus_per_node}", f"--gpus-per-node={t.gpus_per_node}",
                f"--cpus-per-task={t.cpus_per_task}", f"--time={t.time}"]
  directives += [f"--partition={t.partition}"] if t.partition else []
  directives += [f"--account={t.account}"] if t.account else []
  directives += ["--exclusive", f"--output={workdir}/slurm-%j.out"]
  exports = [f"{distributed.ENV_AUTO}=auto",
             f'XLA_FLAGS="${{XLA_FLAGS:-}} {" ".join(GPU_XLA_FLAGS)}"', *GPU_ENV, *t.env]
  srun = shlex.join(["srun", "--kill-on-bad-exit=1", "python", "-m", "vlm_jax.cli.train",
                     *train_args])
  lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives), "set -euo pipefail",
           f"cd {shlex.quote(repo_root)}", *t.setup, *(f"export {e}" for e in exports), srun]
  return "\n".join(lines) + "\n"


def submit_command(script_path: str) -> list[str]:
  return ["sbatch", script_path]
