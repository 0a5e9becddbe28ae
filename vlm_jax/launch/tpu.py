"""`vlm-launch tpu`: a Cloud TPU VM slice (or several, multi-slice) running vlm-train (or
vlm-eval: `--program eval`).

The plan is a list of shell lines, run in order by `run_plan` (or printed by --dry-run):

1. the slice: reused if `describe` finds it, else created — directly
   (`tpu-vm create`) or through a queued resource (`--queued`; required for multi-slice,
   whose nodes are <name>-0 .. <name>-<n-1>), then waited for until ACTIVE;
2. the code: this checkout packed (git-tracked and untracked files, no .git) and copied to
   every worker, then `pip install -e .[tpu]` there (`--code copy`); or `pip install SPEC`
   (`--code pip:SPEC`); or nothing (`--code none`: the image already has it);
3. the run: on every worker of every slice, vlm-train starts detached (SIGHUP ignored) with
   VLM_JAX_DISTRIBUTED=auto, is restarted after a hang (`worker_command`), and writes
   ~/vlm_jax_run.log and its exit status to ~/vlm_jax_run.status (with a gs:// workdir, the log is first copied to
   <workdir>/launch_logs/tpu_<worker hostname>.log); then worker 0 of slice 0's log is
   streamed until that status appears, and the launcher exits with it. A dropped ssh
   connection does not stop training.
4. with --delete, the slice (or queued resource) is deleted at the end, success or not.
"""
import dataclasses
import re
import shlex

from vlm_jax import distributed
from vlm_jax import launch
from vlm_jax import storage
from vlm_jax.train.watchdog import EXIT_HUNG, HANG_REPORTS

REMOTE_DIR = "~/vlm_jax"
REMOTE_LOG = "~/vlm_jax_run.log"
REMOTE_STATUS = "~/vlm_jax_run.status"
CODE_ARCHIVE = "/tmp/vlm_jax_code.tar.gz"
_FAILED_STATES = ("FAILED", "SUSPENDING", "SUSPENDED")
# Copies a worker's log into a gs:// workdir with the credentials vlm-train used.
_UPLOAD_LOG = "import sys; from vlm_jax import storage; storage.copy(sys.argv[1], sys.argv[2])"


@dataclasses.dataclass(frozen=True)
class TpuTarget:
  name: str
  zone: str
  accelerator_type: str  # e.g. v5p-32
  runtime_version: str  # e.g. v2-alpha-tpuv5
  project: str = ""
  num_slices: int = 1
  queued: bool = False
  spot: bool = False
  code: str = "copy"  # copy | none | pip:SPEC
  delete: bool = False
  env: tuple = ()  # ("KEY=VALUE", ...) for the processes
  program: str = "train"  # what every worker runs: vlm-train | vlm-eval
  service_account: str = ""  # the VMs' identity for gs:// ("" = the default compute one)
  scopes: str = ""  # its OAuth scopes, comma-separated ("" = gcloud's default)
  max_hang_restarts: int = 3  # restarts of every worker's program after a hang (exit 76)

  def __post_init__(self):
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", self.name):
      raise ValueError(f"--name={self.name!r}: a TPU name is lowercase letters, digits and "
                       "hyphens, starting with a letter.")
    if self.num_slices < 1:
      raise ValueError(f"--num-slices={self.num_slices} must be >= 1.")
    if not (self.code in ("copy", "none") or self.code.startswith("pip:")):
      raise ValueError(f"--code={self.code!r}: expected copy, none or pip:SPEC.")
    for item in self.env:
      if "=" not in item:
        raise ValueError(f"--env {item!r}: expected KEY=VALUE.")
    launch.module(self.program)  # validates --program
    if self.max_hang_restarts < 0:
      raise ValueError(f"--max-hang-restarts={self.max_hang_restarts} must be >= 0.")

  @property
  def uses_queue(self) -> bool:
    return self.queued or self.num_slices > 1

  @property
  def nodes(self) -> list[str]:
    if self.num_slices == 1:
      return [self.name]
    return [f"{self.name}-{i}" for i in range(self.num_slices)]

  def where(self) -> str:
    where = f"--zone={self.zone}"
    return where + (f" --project={self.project}" if self.project else "")


def _gcloud(t: TpuTarget, group: str, verb: str, *args: str) -> str:
  """`gcloud compute tpus <tpu-vm|queued-resources> <verb> <args> --zone --project`."""
  return " ".join(["gcloud compute tpus", group, verb, *args, t.where()])


def slice_lines(t: TpuTarget) -> list[str]:
  spot = ["--spot"] if t.spot else []
  spot += [f"--service-account={t.service_account}"] if t.service_account else []
  spot += [f"--scopes={t.scopes}"] if t.scopes else []
  if not t.uses_queue:
    create = _gcloud(t, "tpu-vm", "create", t.name, f"--accelerator-type={t.accelerator_type}",
                     f"--version={t.runtime_version}", *spot)
    return [f"{_gcloud(t, 'tpu-vm', 'describe', t.name)} >/dev/null 2>&1 || {create}"]
  nodes = ([f"--node-id={t.name}"] if t.num_slices == 1 else
           [f"--node-count={t.num_slices}", f"--node-prefix={t.name}"])
  create = _gcloud(t, "queued-resources", "create", t.name,
                   f"--accelerator-type={t.accelerator_type}",
                   f"--runtime-version={t.runtime_version}", *nodes, *spot)
  state = _gcloud(t, "queued-resources", "describe", t.name, "--format='value(state.state)'")
  failed = "|".join(_FAILED_STATES)
  wait = (f'while s=$({state}); [ "$s" != ACTIVE ]; do case "$s" in {failed}) '
          f'echo "queued resource {t.name} is $s" >&2; exit 1;; esac; '
          f'echo "queued resource {t.name}: $s; waiting"; sleep 30; done')
  return [f"{_gcloud(t, 'queued-resources', 'describe', t.name)} >/dev/null 2>&1 || {create}",
          wait]


def _ssh(t: TpuTarget, node: str, worker: str, command: str) -> str:
  return _gcloud(t, "tpu-vm", "ssh", node, f"--worker={worker}",
                 f"--command={shlex.quote(command)}")


def code_lines(t: TpuTarget, repo_root: str) -> list[str]:
  if t.code == "none":
    return []
  if t.code.startswith("pip:"):
    install = f"pip install -q {shlex.quote(t.code[4:])}"
    return [_ssh(t, node, "all", install) for node in t.nodes]
  pack = (f"cd {shlex.quote(repo_root)} && git ls-files -z --cached --others "
          f"--exclude-standard | tar --null -T - -czf {CODE_ARCHIVE}")
  unpack = (f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && "
            f"tar -xzf ~/vlm_jax_code.tar.gz -C {REMOTE_DIR} && "
            f'pip install -q -e "$HOME/vlm_jax[tpu]"')
  lines = [pack]
  for node in t.nodes:
    lines.append(_gcloud(t, "tpu-vm", "scp", CODE_ARCHIVE, f"{node}:vlm_jax_code.tar.gz",
                         "--worker=all"))
    lines.append(_ssh(t, node, "all", unpack))
  return lines


def train_command(t: TpuTarget, train_args) -> str:
  env = [f"{distributed.ENV_AUTO}=auto", *t.env]
  return " ".join(shlex.quote(e) for e in env) + " " + shlex.join([f"vlm-{t.program}",
                                                                   *train_args])


def _save_log(workdir: str) -> str:
  """Shell that copies this worker's log into a gs:// workdir (nothing for a local one)."""
  if not storage.is_gcs(workdir):
    return ""
  target = shlex.quote(storage.join(workdir, "launch_logs", "tpu_")) + '"$(hostname)".log'
  return f"python -c {shlex.quote(_UPLOAD_LOG)} {REMOTE_LOG} {target}; "


def _heartbeat_timeout_s(t: TpuTarget) -> int:
  for item in t.env:
    key, value = item.split("=", 1)
    if key == distributed.ENV_HEARTBEAT_TIMEOUT:
      return int(value)
  return distributed.DEFAULT_HEARTBEAT_TIMEOUT_S


def worker_command(t: TpuTarget, train_args, workdir: str = "") -> str:
  """What every worker runs: the program in a detached subshell that ignores SIGHUP (closing
  the ssh session does not stop it), restarted after a hang, then its status written last
  (the launcher, and --delete, wait for it).

  Hangs: every worker decides for itself from its own status (EXIT_HUNG) or a new report in
  the shared <workdir>/hangs/ (the worker that hung exits 76; the others die when its
  heartbeats stop), so all restart together, at most `max_hang_restarts` times. Before a
  restart each waits out the heartbeat timeout and 30 s more, so that no process of the old
  run still holds the chips or the coordinator when the new ones start."""
  workdir_cd = f"cd {REMOTE_DIR}" if t.code == "copy" else "cd ~"
  reports = launch.count_reports_command(storage.join(workdir, HANG_REPORTS))
  limit, program = t.max_hang_restarts, f"vlm-{t.program}"
  restart = (
      "restarts=0; while true; do "
      f"hangs_before=$({reports}) || true; "
      f"{train_command(t, train_args)}; status=$?; "
      f"hangs_after=$({reports}) || true; "
      f'if [ "$status" != {EXIT_HUNG} ] && [ "$hangs_after" = "$hangs_before" ]; then break; fi; '
      f'if [ "$restarts" -ge {limit} ]; then echo "vlm-launch: {program} hung again after '
      f'{limit} restart(s); not restarting it"; break; fi; '
      "restarts=$((restarts + 1)); "
      f'echo "vlm-launch: {program} hung (its report is in the workdir\'s hangs/); restarting '
      f'it (restart $restarts of at most {limit}); it resumes from its newest checkpoint"; '
      f"sleep {_heartbeat_timeout_s(t) + 30}; done")
  return (f"rm -f {REMOTE_STATUS} && {workdir_cd} && (trap '' HUP; {restart}; "
          f"{_save_log(workdir)}echo $status > {REMOTE_STATUS}) "
          f"> {REMOTE_LOG} 2>&1 < /dev/null &")


def run_lines(t: TpuTarget, train_args, workdir: str = "") -> list[str]:
  follow = (f"tail -n +1 -F {REMOTE_LOG} & while [ ! -f {REMOTE_STATUS} ]; do sleep 5; done; "
            f"sleep 2; kill %1; exit $(cat {REMOTE_STATUS})")
  start = worker_command(t, train_args, workdir)
  return [_ssh(t, node, "all", start) for node in t.nodes] + [
      _ssh(t, t.nodes[0], "0", follow)]


def delete_line(t: TpuTarget) -> str:
  if t.uses_queue:
    return _gcloud(t, "queued-resources", "delete", t.name, "--force", "--quiet")
  return _gcloud(t, "tpu-vm", "delete", t.name, "--quiet")


def plan(t: TpuTarget, train_args, repo_root: str, workdir: str = "") -> dict:
  """{'steps': [shell lines], 'finally': [shell lines run even when a step fails]}."""
  return {"steps": slice_lines(t) + code_lines(t, repo_root) + run_lines(t, train_args,
                                                                          workdir),
          "finally": [delete_line(t)] if t.delete else []}
