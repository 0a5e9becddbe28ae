"""Weights & Biases beside metrics.jsonl and TensorBoard: the same scalars at the same steps.

Selected by config.wandb.mode: "disabled" (the default), "offline" (the run is written under
<workdir>/wandb/ with no network; `wandb sync <workdir>/wandb/offline-run-*` uploads it
later) or "online" (needs `wandb login` or WANDB_API_KEY). W&B writes local files only: with
a gs:// workdir they go to ~/.cache/vlm_jax/wandb/<run id>/wandb/ on process 0's host. The W&B run id is derived from the
workdir, so a restarted run continues the same W&B run; W&B keeps the first value it got for
a step, so steps a restart redoes keep the values of the attempt that logged them first
(metrics.jsonl keeps both). Process 0 alone writes, as for the other writers. The console is
not captured (vlm-train's output already goes to the launcher's logs).
"""
import hashlib
import os

from vlm_jax import storage
from vlm_jax.config import ConfigError
from vlm_jax.train import metrics as metrics_lib

MODES = ("disabled", "offline", "online")


def run_id(workdir: str) -> str:
  return hashlib.sha1(storage.abspath(workdir).encode()).hexdigest()[:16]


def files_dir(workdir: str) -> str:
  """Where W&B's files go (it makes a wandb/ directory in it)."""
  if not storage.is_gcs(workdir):
    return workdir
  local = os.path.join(os.path.expanduser("~/.cache/vlm_jax/wandb"), run_id(workdir))
  os.makedirs(local, exist_ok=True)
  return local


class WandbWriter:
  """`write(step, scalars)` and `close()`, as metrics.MetricWriter."""

  def __init__(self, wandb_config, workdir: str, run_config: dict):
    import wandb  # pylint: disable=g-import-not-at-top  (an optional dependency)
    self.run = wandb.init(
        mode=wandb_config.mode, project=wandb_config.project,
        entity=wandb_config.entity or None,
        name=wandb_config.name or os.path.basename(storage.abspath(workdir).rstrip("/")),
        id=run_id(workdir), resume="allow", dir=files_dir(workdir), config=run_config,
        settings=wandb.Settings(console="off"))

  def write(self, step: int, scalars: dict) -> None:
    self.run.log({k: float(v) for k, v in scalars.items()}, step=step)

  def close(self) -> None:
    self.run.finish()


class Writers:
  """Several writers as one."""

  def __init__(self, writers):
    self.writers = writers

  def write(self, step: int, scalars: dict) -> None:
    for writer in self.writers:
      writer.write(step, scalars)

  def close(self) -> None:
    for writer in self.writers:
      writer.close()


def check_mode(wandb_config) -> None:
  if wandb_config.mode not in MODES:
    raise ConfigError(f"config.wandb.mode={wandb_config.mode!r}: expected one of {MODES}.")


def make_writer(config, workdir: str, process_index: int = 0):
  """metrics.jsonl and TensorBoard, plus W&B when config.wandb.mode selects it."""
  check_mode(config.wandb)
  writer = metrics_lib.MetricWriter(workdir)
  if config.wandb.mode == "disabled" or process_index != 0:
    return writer
  return Writers([writer, WandbWriter(config.wandb, workdir, config.to_dict())])
