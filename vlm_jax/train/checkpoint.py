"""Orbax checkpoints of the train state and the data iterator, side by side.

A checkpoint is complete or ignored: on disk orbax writes each step into
`<step>.orbax-checkpoint-tmp` and renames it when every file is written; in gs:// (no rename)
it writes `<step>/` in place and commits it last with `<step>/commit_success.txt`. Either way
a save cut off by a kill never becomes the latest step; the manager deletes such leftovers
when it opens the directory, and we say so.
A complete checkpoint whose files were damaged afterwards fails to restore: `restore_newest`
names it, falls back to the previous one and moves the damaged one aside (kept for
inspection) so the run can write that step again. Nothing is read with pickle: the state is
tensorstore (OCDBT) arrays plus JSON metadata, the data iterator state is JSON.
"""
import os
import re

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from vlm_jax import storage

TMP_MARKER = ".orbax-checkpoint-tmp"


class CheckpointSaveError(OSError):
  """Writing a checkpoint failed (disk full, not writable); the message names both steps."""


class CheckpointRestoreError(RuntimeError):
  """No checkpoint in the directory could be restored; the message names the first error."""


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def _one_line(error: BaseException, limit: int = 300) -> str:
  text = " ".join(f"{type(error).__name__}: {error}".split())
  return text if len(text) <= limit else text[:limit] + "..."


def _os_error(error: BaseException) -> str:
  """'[Errno 28] No space left on device' from an OSError or a tensorstore message, else ''."""
  for e in (error, error.__cause__, error.__context__):
    if isinstance(e, OSError) and e.errno:
      return f"[Errno {e.errno}] {os.strerror(e.errno)}: "
  code = re.search(r"os_error_code='?(\d+)", str(error))
  return f"[Errno {code[1]}] {os.strerror(int(code[1]))}: " if code else ""


class Checkpointer:

  def __init__(self, workdir: str, ckpt_config):
    self.directory = storage.join(storage.abspath(workdir), "checkpoints")
    self.damaged_directory = storage.join(storage.abspath(workdir), "damaged_checkpoints")
    incomplete = self._incomplete_saves()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=ckpt_config.keep,
            save_interval_steps=ckpt_config.every_steps,
            enable_async_checkpointing=ckpt_config.async_save,
            cleanup_tmp_directories=True,
        ),
        item_names=("state", "data"),
    )
    if incomplete:
      _log(f"Ignored incomplete checkpoint write(s) {incomplete} in {self.directory} "
           "(a save was cut off); they were deleted.")
    self._pending_step = None  # step of an asynchronous save that may still be writing

  def _incomplete_saves(self) -> list[str]:
    if not storage.isdir(self.directory):
      return []
    return sorted(n for n in storage.listdir(self.directory) if TMP_MARKER in n or (
        storage.is_gcs(self.directory) and
        ocp.path.step.is_path_temporary(storage.as_path(self.directory) / n)))

  def latest_step(self):
    return self.manager.latest_step()

  def finished_step(self):
    """The newest step on disk, after any save in flight has finished."""
    self.wait()
    return self.manager.latest_step()

  def last_complete_step(self, failed=None):
    """The newest step known to be fully written (waits for no save)."""
    done = [s for s in self.manager.all_steps() if s not in (self._pending_step, failed)]
    return max(done, default=None)

  # ------------------------------------------------------------------------------------------
  # Saving: an OS error while writing becomes a CheckpointSaveError naming the step that failed
  # and the previous complete one, which the failed write never touches.
  # ------------------------------------------------------------------------------------------
  def _save_failed(self, step, error):
    previous = self.last_complete_step(failed=step)
    kept = (f"checkpoint step {previous} in {self.directory} is intact" if previous is not None
            else "no earlier checkpoint exists")
    raise CheckpointSaveError(f"saving checkpoint step {step} failed: {_os_error(error)}"
                              f"{_one_line(error)}; "
                              f"{kept}. Free disk space or choose another --workdir, then "
                              "rerun the same command to resume.") from error

  def save(self, step: int, state, data_iterator, force: bool = False) -> bool:
    self.wait()  # orbax waits for the previous save anyway; this attributes its errors
    try:
      saved = self.manager.save(
          step,
          args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=grain.checkpoint.CheckpointSave(data_iterator)),
          force=force)
    except Exception as e:  # orbax and tensorstore raise several types for one OS error
      self._save_failed(step, e)
    if saved:
      self._pending_step = step
    return saved

  def wait(self):
    step, self._pending_step = self._pending_step, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      self._save_failed(step, e)

  def close(self):
    self.manager.close()

  # ------------------------------------------------------------------------------------------
  # Restoring: newest complete checkpoint first; damaged ones are named and skipped.
  # ------------------------------------------------------------------------------------------
  def restore(self, step: int, abstract_state, data_iterator=None):
    """The state at `step`; also sets `data_iterator`'s position unless it is None."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def restore_newest(self, abstract_state, data_iterator):
    """(step, state) from the newest checkpoint that restores, or (None, None) if none exist.

    A failing checkpoint is moved aside only once an older one has restored: if every one
    fails, the cause is more likely a changed config than damage, so nothing is moved and the
    error names the newest checkpoint's failure.
    """
    failed = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state = self.restore(step, abstract_state, data_iterator)
      except Exception as e:  # damaged files surface as tensorstore, JSON or orbax errors
        _log(f"Checkpoint step {step} in {self.directory} is damaged and was skipped: "
             f"{_one_line(e)}")
        failed.append((step, e))
        continue
      self._move_aside([s for s, _ in failed])
      return step, state
    if failed:
      step, error = failed[0]
      raise CheckpointRestoreError(
          f"no checkpoint in {self.directory} could be restored (steps "
          f"{[s for s, _ in failed]}); step {step} failed with {_one_line(error)}. If the "
          "config changed since they were written, use a new --workdir.") from error
    return None, None

  def _move_aside(self, steps):
    if not steps:
      return
    if jax.process_index() == 0:
      storage.makedirs(self.damaged_directory)
      for step in steps:
        target = storage.join(self.damaged_directory, str(step))
        storage.rmtree(target)
        storage.move(storage.join(self.directory, str(step)), target)
        _log(f"Moved damaged checkpoint step {step} to {target}.")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("vlm_jax_move_damaged_checkpoints")
    self.manager.reload()
