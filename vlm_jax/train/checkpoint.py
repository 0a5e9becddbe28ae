"""Orbax checkpoints of the train state and the data iterator, side by side.

Orbax writes each step into a temporary directory and renames it when complete, so a save cut
off by a kill never becomes the latest step; `latest_step()` only sees finished ones.
"""
import os

import grain
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, workdir: str, ckpt_config):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
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

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator, force: bool = False) -> bool:
    return self.manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                data=grain.checkpoint.CheckpointSave(data_iterator)),
        force=force)

  def restore(self, step: int, abstract_state, data_iterator):
    restored = self.manager.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored["state"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
