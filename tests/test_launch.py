"""vlm-launch --dry-run: the exact commands (tpu, local) and sbatch script (slurm) it would run;
the GPU XLA flags it sets are ones this jaxlib knows (an unknown flag aborts every process);
what the local launcher, a TPU worker and the sbatch script do after a hang (exit 76)."""
import os
import shlex
import subprocess
import sys

import pytest

from vlm_jax.cli import launch as launch_cli
from vlm_jax.launch import local, slurm, tpu

REPO = launch_cli.REPO_ROOT
TRAIN = ["--config", "configs/simvlm.py:large", "--workdir", "/mnt/runs/large",
         "--config.mesh.shape=(1,-1,1)"]


def dry_run(capsys, *argv) -> str:
  with pytest.raises(SystemExit) as exit_info:
    launch_cli.main([*argv, "--dry-run", *TRAIN])
  assert exit_info.value.code == 0
  return capsys.readouterr().out


def test_tpu_single_slice(capsys):
  out = dry_run(capsys, "tpu", "--name", "vlm-v5p", "--zone", "us-east5-a",
                "--accelerator-type", "v5p-32", "--runtime-version", "v2-alpha-tpuv5",
                "--project", "my-proj", "--delete", "--env", "LIBTPU_INIT_ARGS=--xla_x=1")
  where = "--zone=us-east5-a --project=my-proj"
  ssh = "gcloud compute tpus tpu-vm ssh vlm-v5p"
  # What each worker runs in the background (its hang restarts: test_tpu_workers_restart_...).
  start = tpu.worker_command(
      tpu.TpuTarget(name="vlm-v5p", zone="us-east5-a", accelerator_type="v5p-32",
                    runtime_version="v2-alpha-tpuv5", env=("LIBTPU_INIT_ARGS=--xla_x=1",)),
      TRAIN, "/mnt/runs/large")
  assert start.startswith("rm -f ~/vlm_jax_run.status && cd ~/vlm_jax && (trap '' HUP; "), start
  assert ("VLM_JAX_DISTRIBUTED=auto LIBTPU_INIT_ARGS=--xla_x=1 vlm-train --config "
          "configs/simvlm.py:large --workdir /mnt/runs/large '--config.mesh.shape=(1,-1,1)'; "
          "status=$?;") in start
  assert start.endswith("echo $status > ~/vlm_jax_run.status) > ~/vlm_jax_run.log 2>&1 "
                        "< /dev/null &"), start
  assert out.splitlines() == [
      f"gcloud compute tpus tpu-vm describe vlm-v5p {where} >/dev/null 2>&1 || "
      f"gcloud compute tpus tpu-vm create vlm-v5p --accelerator-type=v5p-32 "
      f"--version=v2-alpha-tpuv5 {where}",
      f"cd {REPO} && git ls-files -z --cached --others --exclude-standard | "
      "tar --null -T - -czf /tmp/vlm_jax_code.tar.gz",
      "gcloud compute tpus tpu-vm scp /tmp/vlm_jax_code.tar.gz vlm-v5p:vlm_jax_code.tar.gz "
      f"--worker=all {where}",
      f"{ssh} --worker=all --command='rm -rf ~/vlm_jax && mkdir -p ~/vlm_jax && "
      "tar -xzf ~/vlm_jax_code.tar.gz -C ~/vlm_jax && "
      f"pip install -q -e \"$HOME/vlm_jax[tpu]\"' {where}",
      f"{ssh} --worker=all --command={shlex.quote(start)} {where}",
      f"{ssh} --worker=0 --command='tail -n +1 -F ~/vlm_jax_run.log & while [ ! -f "
      "~/vlm_jax_run.status ]; do sleep 5; done; sleep 2; kill %1; "
      f"exit $(cat ~/vlm_jax_run.status)' {where}",
      "# always, at the end:",
      f"gcloud compute tpus tpu-vm delete vlm-v5p --quiet {where}",
  ]


def test_tpu_multislice_goes_through_a_queued_resource(capsys):
  out = dry_run(capsys, "tpu", "--name", "vlm", "--zone", "us-east5-a", "--accelerator-type",
                "v5p-128", "--runtime-version", "v2-alpha-tpuv5", "--num-slices", "2",
                "--code", "none", "--spot")
  lines = out.splitlines()
  assert lines[0] == (
      "gcloud compute tpus queued-resources describe vlm --zone=us-east5-a >/dev/null 2>&1 || "
      "gcloud compute tpus queued-resources create vlm --accelerator-type=v5p-128 "
      "--runtime-version=v2-alpha-tpuv5 --node-count=2 --node-prefix=vlm --spot "
      "--zone=us-east5-a")
  assert lines[1].startswith("while s=$(gcloud compute tpus queued-resources describe vlm "
                             "--format='value(state.state)' --zone=us-east5-a); "
                             "[ \"$s\" != ACTIVE ]; do")
  # Both slices start the same command on all their workers; slice 0 worker 0 is streamed.
  assert [line.split(" --worker=")[0] for line in lines[2:]] == [
      "gcloud compute tpus tpu-vm ssh vlm-0", "gcloud compute tpus tpu-vm ssh vlm-1",
      "gcloud compute tpus tpu-vm ssh vlm-0"]
  assert lines[2].replace("vlm-0", "vlm-1") == lines[3]
  assert "--worker=all" in lines[2] and "--worker=0" in lines[4] and "cd ~ &&" in lines[2]
  assert len(lines) == 5  # --code none copies nothing; no --delete


def test_slurm_script(capsys):
  out = dry_run(capsys, "slurm", "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu",
                "--account", "proj", "--time", "12:00:00",
                "--setup", "source ~/venv/bin/activate")
  flags = " ".join(slurm.GPU_XLA_FLAGS)
  assert out == f"""# /mnt/runs/large/launch.sbatch
#!/bin/bash
#SBATCH --job-name=vlm_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --partition=gpu
#SBATCH --account=proj
#SBATCH --exclusive
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=/mnt/runs/large/slurm-%j.out
set -euo pipefail
cd {REPO}
source ~/venv/bin/activate
export VLM_JAX_DISTRIBUTED=auto
export XLA_FLAGS="${{XLA_FLAGS:-}} {flags}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.90
notice=""
trap 'notice=1; echo "vlm-launch: preemption notice (SIGUSR1); SIGTERM to every task"; \
scancel --signal=TERM "$SLURM_JOB_ID" || true' USR1
hangs_before=$(ls /mnt/runs/large/hangs 2>/dev/null | wc -l) || true
srun --kill-on-bad-exit=1 python -m vlm_jax.cli.train --config configs/simvlm.py:large \
--workdir /mnt/runs/large '--config.mesh.shape=(1,-1,1)' &
step=$!
while true; do
  wait "$step" && status=0 || status=$?
  kill -0 "$step" 2>/dev/null || break
done
hangs_after=$(ls /mnt/runs/large/hangs 2>/dev/null | wc -l) || true
if [ "$status" = 76 ] || [ "$hangs_after" != "$hangs_before" ]; then
  requeues=$(( $(cat /mnt/runs/large/hang_requeues 2>/dev/null || echo 0) + 1 ))
  echo "$requeues" > /mnt/runs/large/hang_requeues
  if [ "$requeues" -le 3 ]; then
    echo "vlm-launch: vlm-train hung (its report is in the workdir's hangs/); requeueing job \
$SLURM_JOB_ID (hang requeue $requeues of at most 3)"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  echo "vlm-launch: vlm-train hung again after 3 requeue(s); not requeueing"
fi
if [ "$status" = 75 ] || {{ [ -n "$notice" ] && [ "$status" != 0 ]; }}; then
  echo "vlm-launch: requeueing job $SLURM_JOB_ID (tasks exited $status); it resumes from its \
newest checkpoint"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
# then: sbatch /mnt/runs/large/launch.sbatch
"""


def test_slurm_cpu_script_sets_the_platform_and_devices_per_task(capsys):
  out = dry_run(capsys, "slurm", "--nodes", "1", "--tasks-per-node", "2",
                "--cpu-devices-per-task", "4", "--cpus-per-task", "1", "--signal", "TERM@90")
  assert "#SBATCH --ntasks-per-node=2\n#SBATCH --cpus-per-task=1\n" in out
  assert "--gpus" not in out and "--exclusive" not in out and "XLA_PYTHON_CLIENT" not in out
  assert 'export JAX_PLATFORMS=cpu\nexport XLA_FLAGS="${XLA_FLAGS:-} ' \
      '--xla_force_host_platform_device_count=4"\n' in out
  assert "#SBATCH --signal=B:TERM@90\n" in out and "(SIGTERM); SIGTERM to every task" in out
  assert out.count("' TERM\n") == 1  # the trap is on the notice signal


def test_the_requeue_status_is_vlm_trains_preemption_status():
  from vlm_jax.cli import train  # pylint: disable=g-import-not-at-top
  assert slurm.EXIT_PREEMPTED == train.EXIT_PREEMPTED


# The sbatch script's decisions after srun, run by bash with `srun` and `scontrol` replaced by
# scripts that act out how a job ended (the real cluster runs are in tests/test_slurm.py).
_FAKE_SRUN = """#!/bin/bash
[ -n "$HANG_REPORT" ] && "$PYTHON" -c "import os; from vlm_jax import storage; \\
storage.write_atomic(storage.join(os.environ['REPORTS'], os.environ['HANG_REPORT']), 'stacks')"
exit "$SRUN_STATUS"
"""
_FAKE_SCONTROL = """#!/bin/bash
echo "$@" >> "$WORKDIR/scontrol_calls"
"""


def run_sbatch_script(tmp_path, srun_status, report, requeues_before=0, reports=""):
  """(bash's result, the job's output directory) after the script ran with srun ending as
  `srun_status`, one task's watchdog having written `report` ("": none) into `reports`."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  if requeues_before:
    (workdir / "hang_requeues").write_text(f"{requeues_before}\n")
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, text in (("srun", _FAKE_SRUN), ("scontrol", _FAKE_SCONTROL)):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  reports = reports or str(workdir / "hangs")
  target = slurm.SlurmTarget(nodes=1, tasks_per_node=2, cpu_devices_per_task=1)
  script = slurm.script(target, ["--config", "c.py:tiny", "--workdir", str(workdir)],
                        str(workdir), REPO, reports)
  # `python` in the script (a gs:// count) is the job's: this interpreter.
  env = {**os.environ, "PATH": os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable),
                                                os.environ["PATH"]]),
         "PYTHONPATH": REPO, "PYTHON": sys.executable, "SLURM_JOB_ID": "42",
         "WORKDIR": str(workdir), "REPORTS": reports, "SRUN_STATUS": str(srun_status),
         "HANG_REPORT": report}
  result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                          timeout=120)
  return result, workdir


@pytest.mark.parametrize("srun_status, report, requeues_before, requeued, status", [
    (76, "", 0, True, 0),  # every task's watchdog fired
    (137, "process_1_1.txt", 0, True, 0),  # one task hung, srun killed the others
    (137, "process_1_2.txt", 3, False, 137),  # the 4th hang: a person must look
    (137, "", 0, False, 137),  # a crash without a hang report is the job's failure
    (75, "", 3, True, 0),  # preemptions requeue whatever the hang count
])
def test_the_sbatch_script_requeues_hangs_at_most_max_hang_requeues_times(
    tmp_path, srun_status, report, requeues_before, requeued, status):
  result, workdir = run_sbatch_script(tmp_path, srun_status, report, requeues_before)
  assert result.returncode == status, result.stdout + result.stderr
  calls = (workdir / "scontrol_calls").read_text() if requeued else ""
  assert calls == ("requeue 42\n" if requeued else ""), result.stdout
  assert not (workdir / "scontrol_calls").exists() or requeued
  if srun_status != 75 and (report or srun_status == 76):
    assert (workdir / "hang_requeues").read_text().strip() == str(requeues_before + 1)


def test_the_sbatch_script_sees_a_hang_report_in_a_gs_workdir(tmp_path, gcs_dir):
  reports = f"{gcs_dir}/hangs"
  result, workdir = run_sbatch_script(tmp_path, 137, "process_1_1.txt", reports=reports)
  assert result.returncode == 0, result.stdout + result.stderr
  assert (workdir / "scontrol_calls").read_text() == "requeue 42\n"
  assert "hang requeue 1 of at most 3" in result.stdout


@pytest.mark.parametrize("outcomes, max_restarts, runs, status", [
    ([(76, ""), (0, "")], 3, 2, 0),  # hung, restarted, finished
    ([(137, "process_1_1.txt"), (0, "")], 3, 2, 0),  # one process hung, the other was killed
    ([(76, "")] * 3, 1, 2, 76),  # hangs again after the last restart: given up
    ([(1, "")], 3, 1, 1),  # a crash is not a hang
])
def test_vlm_launch_local_restarts_hangs_at_most_max_hang_restarts_times(
    tmp_path, capsys, outcomes, max_restarts, runs, status):
  ran = []

  def run_once():  # acts out one run of the job: its status, and a watchdog report it wrote
    code, report = outcomes[len(ran)]
    ran.append(code)
    if report:
      (tmp_path / "hangs").mkdir(exist_ok=True)
      (tmp_path / "hangs" / report).write_text("stacks")
    return code

  assert local.restarting_hangs(run_once, str(tmp_path), max_restarts) == status
  assert len(ran) == runs
  out = capsys.readouterr().out
  assert out.count("restarting it (restart") == min(runs - 1, max_restarts)
  with pytest.raises(ValueError, match="--max-hang-restarts=-1 must be >= 0"):
    local.restarting_hangs(run_once, str(tmp_path), -1)


# A TPU worker's command, run by bash with `vlm-train` and `sleep` replaced by scripts: the
# program acts out one run per call (its status, a watchdog report it wrote); sleep records
# how long the worker would wait before a restart.
_FAKE_PROGRAM = """#!/bin/bash
run=$(( $(cat "$HOME/runs" 2>/dev/null || echo 0) + 1 )); echo $run > "$HOME/runs"
outcome=$(echo "$OUTCOMES" | cut -d' ' -f$run)
report=${outcome#*:}
[ -n "$report" ] && mkdir -p "$WORKDIR/hangs" && echo stacks > "$WORKDIR/hangs/$report"
exit ${outcome%%:*}
"""
_FAKE_SLEEP = """#!/bin/bash
echo "$@" >> "$HOME/sleeps"
"""


@pytest.mark.parametrize("outcomes, max_restarts, runs, status", [
    ("76: 0:", 3, 2, 0),  # every worker's watchdog fired; restarted, finished
    ("1:process_3.txt 0:", 3, 2, 0),  # another worker hung; this one lost its heartbeats
    ("76: 76: 76:", 1, 2, 76),  # hangs again after the last restart: given up
    ("1:", 3, 1, 1),  # a crash is not a hang
])
def test_tpu_workers_restart_hangs_at_most_max_hang_restarts_times(
    tmp_path, outcomes, max_restarts, runs, status):
  workdir = tmp_path / "run"
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, text in (("vlm-train", _FAKE_PROGRAM), ("sleep", _FAKE_SLEEP)):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  target = tpu.TpuTarget(name="vlm", zone="z", accelerator_type="v5p-32", runtime_version="r",
                         code="none", max_hang_restarts=max_restarts,
                         env=("VLM_JAX_HEARTBEAT_TIMEOUT_S=45",))
  command = tpu.worker_command(target, ["--config", "c.py:tiny", "--workdir", str(workdir)],
                               str(workdir))
  env = {**os.environ, "HOME": str(tmp_path), "WORKDIR": str(workdir), "OUTCOMES": outcomes,
         "PATH": os.pathsep.join([str(bin_dir), os.environ["PATH"]])}
  subprocess.run(["bash", "-c", command], env=env, check=True, timeout=60)
  status_file = tmp_path / "vlm_jax_run.status"
  for _ in range(600):  # the command runs detached; its status is written last
    if status_file.exists() and status_file.read_text().strip():
      break
    subprocess.run(["/bin/sleep", "0.1"], check=True)
  log = (tmp_path / "vlm_jax_run.log").read_text()
  assert status_file.read_text().strip() == str(status), log
  assert (tmp_path / "runs").read_text().strip() == str(runs), log
  sleeps = (tmp_path / "sleeps").read_text().split() if runs > 1 else []
  assert sleeps == ["75"] * (runs - 1), log  # the heartbeat timeout and 30 s
  assert log.count("restarting it (restart") == runs - 1, log
  assert ("hung again after" in log) == (status == 76), log


def test_local_two_processes(capsys):
  out = dry_run(capsys, "local", "--num-processes", "2", "--cpu-devices-per-process", "2",
                "--port", "4321")
  train = (f"{sys.executable} -m vlm_jax.cli.train --config configs/simvlm.py:large "
           "--workdir /mnt/runs/large '--config.mesh.shape=(1,-1,1)'")
  flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                   if not f.startswith("--xla_force_host_platform_device_count"))
  xla = f"'{flags} --xla_force_host_platform_device_count=2'" if flags else \
      "--xla_force_host_platform_device_count=2"
  assert out.splitlines() == [
      f"JAX_PLATFORMS=cpu VLM_JAX_COORDINATOR=localhost:4321 VLM_JAX_HEARTBEAT_TIMEOUT_S=20 "
      f"VLM_JAX_NUM_PROCESSES=2 VLM_JAX_PROCESS_ID={i} XLA_FLAGS={xla} {train}"
      for i in range(2)]


def test_program_eval_runs_vlm_eval_on_every_target(capsys):
  local = dry_run(capsys, "local", "--num-processes", "2", "--program", "eval")
  assert all(" -m vlm_jax.cli.eval --config " in line for line in local.splitlines())
  tpu = dry_run(capsys, "tpu", "--name", "vlm", "--zone", "z", "--accelerator-type", "v5p-16",
                "--runtime-version", "r", "--program", "eval")
  assert "VLM_JAX_DISTRIBUTED=auto vlm-eval --config" in tpu and "vlm-train" not in tpu
  sbatch = dry_run(capsys, "slurm", "--nodes", "2", "--gpus-per-node", "8", "--program", "eval")
  assert "srun --kill-on-bad-exit=1 python -m vlm_jax.cli.eval --config" in sbatch
  assert "launch_eval.sbatch" in sbatch


@pytest.mark.parametrize("argv, message", [
    (["tpu", "--name", "Bad_Name", "--zone", "z", "--accelerator-type", "v5p-8",
      "--runtime-version", "r"], "--name='Bad_Name'"),
    (["slurm", "--nodes", "1", "--gpus-per-node", "8", "--time", "tomorrow"], "--time"),
    (["slurm", "--nodes", "1", "--gpus-per-node", "8", "--signal", "USR1"], "--signal='USR1'"),
    (["slurm", "--nodes", "1", "--gpus-per-node", "8", "--cpu-devices-per-task", "2"],
     "either --gpus-per-node"),
    (["slurm", "--nodes", "1", "--gpus-per-node", "8", "--tasks-per-node", "2"],
     "--tasks-per-node=2"),
    (["local", "--num-processes", "0"], "--num-processes=0"),
])
def test_bad_launcher_options_name_the_option(capsys, argv, message):
  with pytest.raises(SystemExit) as exit_info:
    launch_cli.main([*argv, "--dry-run", *TRAIN])
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err


def test_train_arguments_are_required(capsys):
  with pytest.raises(SystemExit):
    launch_cli.main(["local", "--dry-run", "--workdir", "/tmp/x"])
  assert "--config" in capsys.readouterr().err


def test_the_gpu_xla_flags_exist_in_this_jaxlib():
  env = {**os.environ, "XLA_FLAGS": " ".join(slurm.GPU_XLA_FLAGS), "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-c",
                           "import jax.numpy as jnp; print(jnp.ones(2).sum())"], env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0 and "2.0" in result.stdout, result.stderr[-2000:]


def test_tpu_with_a_gcs_workdir_copies_each_workers_log_there_before_its_status(capsys):
  train = ["--config", "configs/simvlm.py:large", "--workdir", "gs://b/runs/large"]
  with pytest.raises(SystemExit) as exit_info:
    launch_cli.main(["tpu", "--name", "vlm", "--zone", "z", "--accelerator-type", "v5p-32",
                     "--runtime-version", "r", "--code", "none", "--service-account",
                     "trainer@p.iam.gserviceaccount.com", "--scopes", "cloud-platform",
                     "--dry-run", *train])
  assert exit_info.value.code == 0
  captured = capsys.readouterr()
  lines = captured.out.splitlines()
  assert lines[0].endswith("gcloud compute tpus tpu-vm create vlm --accelerator-type=v5p-32 "
                           "--version=r --service-account=trainer@p.iam.gserviceaccount.com "
                           "--scopes=cloud-platform --zone=z")
  upload = ("python -c '\"'\"'import sys; from vlm_jax import storage; storage.copy(sys.argv[1], "
            "sys.argv[2])'\"'\"' ~/vlm_jax_run.log gs://b/runs/large/launch_logs/tpu_\"$(hostname)\""
            ".log; ")
  assert ("vlm-train --config configs/simvlm.py:large --workdir gs://b/runs/large; "
          "status=$?;") in lines[1], lines[1]
  assert f"done; {upload}echo $status > ~/vlm_jax_run.status)" in lines[1], lines[1]
  assert captured.err == ""  # no note: gs:// needs no shared mount


def test_tpu_with_a_local_workdir_notes_the_shared_mount_it_needs(capsys):
  with pytest.raises(SystemExit):
    launch_cli.main(["tpu", "--name", "vlm", "--zone", "z", "--accelerator-type", "v5p-32",
                     "--runtime-version", "r", "--code", "none", "--dry-run", *TRAIN])
  assert "--workdir /mnt/runs/large is not gs://" in capsys.readouterr().err
