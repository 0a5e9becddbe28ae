"""vlm-launch TARGET [launcher options] --config ... --workdir ... [other program args]

One command line for every target; arguments the launcher does not know go to the program
every process runs: vlm-train, or vlm-eval with `--program eval`.

  vlm-launch local --config configs/simvlm.py:tiny --workdir /tmp/run
  vlm-launch local --num-processes 2 --cpu-devices-per-process 2 --config ... --workdir ...
  vlm-launch tpu --name my-v5p --zone us-east5-a --accelerator-type v5p-32 \\
      --runtime-version v2-alpha-tpuv5 --config configs/simvlm.py:large --workdir gs://b/runs/a
  vlm-launch slurm --nodes 2 --gpus-per-node 8 --partition gpu --config ... --workdir ...
  vlm-launch slurm --nodes 1 --tasks-per-node 2 --cpu-devices-per-task 2 --config ... --workdir ...
  vlm-launch local --num-processes 2 --program eval --config ... --workdir ... [--task NAME]

--dry-run prints exactly what would run (commands, environment, the sbatch script) and runs
nothing. Docs: docs/launch.md.
"""
import argparse
import os
import subprocess
import sys

from vlm_jax import launch, storage
from vlm_jax.launch import local, slurm, tpu
from vlm_jax.train.watchdog import HANG_REPORTS

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="vlm-launch", description=__doc__, allow_abbrev=False,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  targets = parser.add_subparsers(dest="target", required=True)

  def target(name, help_text):
    sub = targets.add_parser(name, help=help_text, allow_abbrev=False)
    sub.add_argument("--dry-run", action="store_true", help="print what would run; run nothing")
    sub.add_argument("--program", choices=sorted(launch.PROGRAMS), default="train",
                     help="what every process runs: vlm-train (default) or vlm-eval")
    return sub

  loc = target("local", "this machine: one process, or N CPU processes via jax.distributed")
  loc.add_argument("--num-processes", type=int, default=1)
  loc.add_argument("--cpu-devices-per-process", type=int, default=None,
                   help="run on CPU with this many devices per process (default: 1 when "
                   "--num-processes > 1, else the machine's own devices)")
  loc.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
  loc.add_argument("--heartbeat-timeout-s", type=int, default=20,
                   help="a process whose heartbeats stop this long ends the job")
  loc.add_argument("--grace-s", type=float, default=60.0,
                   help="after a failure, how long the others get to stop by themselves")
  loc.add_argument("--max-hang-restarts", type=int, default=3,
                   help="restart vlm-train this many times after its watchdog found a hang "
                   "(exit 76); it resumes from its newest checkpoint")

  tp = target("tpu", "a Cloud TPU VM slice (or several: --num-slices)")
  tp.add_argument("--name", required=True, help="TPU (or queued resource) name")
  tp.add_argument("--zone", required=True)
  tp.add_argument("--accelerator-type", required=True, help="e.g. v5p-32, v5litepod-16")
  tp.add_argument("--runtime-version", required=True, help="e.g. v2-alpha-tpuv5")
  tp.add_argument("--project", default="")
  tp.add_argument("--num-slices", type=int, default=1, help=">1: multi-slice (queued)")
  tp.add_argument("--queued", action="store_true", help="create through a queued resource")
  tp.add_argument("--spot", action="store_true")
  tp.add_argument("--code", default="copy", help="copy | none | pip:SPEC (how workers get it)")
  tp.add_argument("--delete", action="store_true", help="delete the slice at the end")
  tp.add_argument("--env", action="append", default=[], help="KEY=VALUE for vlm-train")
  tp.add_argument("--service-account", default="", help="the VMs' service account, which "
                  "reads and writes gs:// (default: the project's default compute one)")
  tp.add_argument("--scopes", default="", help="its OAuth scopes, e.g. cloud-platform")
  tp.add_argument("--max-hang-restarts", type=int, default=3,
                  help="restart vlm-train on every worker this many times after it hung "
                  "(exit 76); it resumes from its newest checkpoint")

  sl = target("slurm", "a SLURM cluster: sbatch, one task per GPU (or N CPU tasks per node)")
  sl.add_argument("--nodes", type=int, required=True)
  sl.add_argument("--gpus-per-node", type=int, default=0, help="GPU nodes: one task per GPU")
  sl.add_argument("--tasks-per-node", type=int, default=0, help="CPU nodes: tasks per node")
  sl.add_argument("--cpu-devices-per-task", type=int, default=0,
                  help="CPU nodes: jax CPU devices per task (JAX_PLATFORMS=cpu)")
  sl.add_argument("--time", default="24:00:00")
  sl.add_argument("--signal", default="USR1@300",
                  help="SIGNAL@SECONDS: SLURM's notice this long before --time; the job then "
                  "saves a checkpoint and requeues itself")
  sl.add_argument("--job-name", default="vlm_jax")
  sl.add_argument("--partition", default="")
  sl.add_argument("--account", default="")
  sl.add_argument("--cpus-per-task", type=int, default=8)
  sl.add_argument("--setup", action="append", default=[],
                  help="shell line before srun, e.g. 'source ~/venv/bin/activate'")
  sl.add_argument("--env", action="append", default=[], help="KEY=VALUE exported")
  sl.add_argument("--max-hang-requeues", type=int, default=3,
                  help="requeue the job at most this many times after vlm-train hung (exit 76)")
  sl.add_argument("--script", default=None,
                  help="where to write the sbatch script (default: <workdir>/launch.sbatch; "
                  "launch_eval.sbatch for --program eval)")
  return parser


def _workdir(parser, train_args) -> str:
  for i, arg in enumerate(train_args):
    if arg == "--workdir" and i + 1 < len(train_args):
      return train_args[i + 1]
    if arg.startswith("--workdir="):
      return arg.split("=", 1)[1]
  parser.error("the program needs --workdir DIR (and --config path.py:arg)")


def _run_shell_plan(steps, final) -> int:
  try:
    for line in steps:
      print(f"vlm-launch: + {line}", flush=True)
      status = subprocess.run(["bash", "-c", line], check=False).returncode
      if status:
        print(f"vlm-launch: step failed with status {status}", file=sys.stderr)
        return status
    return 0
  finally:
    for line in final:
      print(f"vlm-launch: + {line}", flush=True)
      subprocess.run(["bash", "-c", line], check=False)


def main(argv=None):
  parser = _parser()
  args, train_args = parser.parse_known_args(argv)
  if not any(a == "--config" or a.startswith("--config=") for a in train_args):
    parser.error("the program needs --config path.py:arg")
  workdir = _workdir(parser, train_args)
  try:
    if args.target == "local":
      sys.exit(_local(args, train_args, workdir))
    if args.target == "tpu":
      sys.exit(_tpu(args, train_args, workdir))
    sys.exit(_slurm(args, train_args, workdir))
  except (ValueError, storage.StorageError) as e:
    parser.error(str(e))


def _local(args, train_args, workdir) -> int:
  if args.num_processes < 1:
    raise ValueError(f"--num-processes={args.num_processes} must be >= 1.")
  cpu_devices = args.cpu_devices_per_process
  if cpu_devices is None and args.num_processes > 1:
    cpu_devices = 1
  port = args.port or local.free_port()
  envs = local.process_envs(args.num_processes, cpu_devices, port, args.heartbeat_timeout_s)
  if args.dry_run:
    print("\n".join(local.commands(train_args, envs, args.program)))
    return 0

  def run_once():
    nonlocal envs
    status = local.run(train_args, envs, os.path.join(workdir, "launch_logs"), args.grace_s,
                       args.program)
    # A restart gets a new coordinator port: the old one may not be free yet.
    envs = local.process_envs(args.num_processes, cpu_devices, args.port or local.free_port(),
                              args.heartbeat_timeout_s)
    return status

  return local.restarting_hangs(run_once, workdir, args.max_hang_restarts)


def _tpu(args, train_args, workdir) -> int:
  target = tpu.TpuTarget(
      name=args.name, zone=args.zone, accelerator_type=args.accelerator_type,
      runtime_version=args.runtime_version, project=args.project, num_slices=args.num_slices,
      queued=args.queued, spot=args.spot, code=args.code, delete=args.delete,
      env=tuple(args.env), service_account=args.service_account, scopes=args.scopes,
      program=args.program, max_hang_restarts=args.max_hang_restarts)
  if not storage.is_gcs(storage.validate(workdir)):
    print(f"vlm-launch: note: --workdir {workdir} is not gs://: the TPU VMs share no disk, so "
          "it must be a mount every worker sees at that path (NFS/Filestore); use "
          "gs://bucket/run otherwise", file=sys.stderr)
  plan = tpu.plan(target, train_args, REPO_ROOT, workdir)
  if args.dry_run:
    print("\n".join(plan["steps"]))
    for line in plan["finally"]:
      print(f"# always, at the end:\n{line}")
    return 0
  return _run_shell_plan(plan["steps"], plan["finally"])


def _slurm(args, train_args, workdir) -> int:
  target = slurm.SlurmTarget(
      nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
      cpu_devices_per_task=args.cpu_devices_per_task, time=args.time, signal=args.signal,
      job_name=args.job_name, partition=args.partition, account=args.account,
      cpus_per_task=args.cpus_per_task, setup=tuple(args.setup), env=tuple(args.env),
      program=args.program, max_hang_requeues=args.max_hang_requeues)
  if storage.is_gcs(workdir) and not args.script:
    raise ValueError(f"--workdir {workdir}: sbatch reads its script and writes its output on "
                     "a filesystem, not gs://; pass --script /shared/dir/launch.sbatch (the "
                     "output goes beside it)")
  name = "launch.sbatch" if args.program == "train" else f"launch_{args.program}.sbatch"
  path = args.script or os.path.join(workdir, name)
  output_dir = os.path.dirname(os.path.abspath(path)) if storage.is_gcs(workdir) else workdir
  text = slurm.script(target, train_args, os.path.abspath(output_dir), REPO_ROOT,
                      storage.join(storage.abspath(workdir), HANG_REPORTS))
  if args.dry_run:
    print(f"# {path}\n{text}# then: {' '.join(slurm.submit_command(path))}")
    return 0
  os.makedirs(output_dir, exist_ok=True)  # sbatch writes its --output there
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  print(f"vlm-launch: wrote {path}", flush=True)
  return subprocess.run(slurm.submit_command(path), check=False).returncode


if __name__ == "__main__":
  main()
