"""MiniGPT-v2's three stages chained through config.init_from on the tiny config."""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from vlm_jax import config as config_lib
from vlm_jax import params
from vlm_jax.train import init_from, loop
from vlm_jax.train import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "minigpt_v2.py")
STEPS = 16


def stage_config(stage, init_from_dir="", **overrides):
  values = {"batch_size": "8", "num_train_steps": str(STEPS), "log_every_steps": "1",
            "checkpoint.every_steps": "1000", "checkpoint.async_save": "False",
            "optimizer.learning_rate": "3e-3", "optimizer.warmup_steps": "2",
            "mesh.shape": "(1, 1, 1)", "init_from": str(init_from_dir)}
  values.update(overrides)
  return config_lib.load_config(f"{CONFIG}:tiny,stage={stage}", list(values.items()))


def trainer_for(config, workdir):
  return loop.Trainer(config, str(workdir), jax.devices()[:1])


def read_losses(workdir) -> list[float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  return [r["loss"] for r in records]


def flat_params(state) -> dict:
  flat = traverse_util.flatten_dict(state.params, sep="/")
  flat.update(traverse_util.flatten_dict(state.frozen, sep="/"))
  return flat


def first_batch_losses(trainer, *states) -> list[float]:
  """Loss of each state (no dropout) on the batch the trainer's first step will see."""
  start = trainer.data.get_state()
  batch = next(trainer.data)
  trainer.data.set_state(start)
  @jax.jit
  def loss(trainable, frozen):
    logits = trainer.model.apply({"params": params.merge_params(trainable, frozen)}, batch,
                                 deterministic=True)
    return step_lib.token_cross_entropy(logits, batch)
  return [float(num / den) for num, den in (loss(s.params, s.frozen) for s in states)]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("minigpt_v2") / "stage1"
  trainer = trainer_for(stage_config(1), workdir)
  return workdir, jax.device_get(trainer.run()), trainer


def test_three_stages_each_start_from_the_previous_checkpoint(stage1, tmp_path):
  previous, previous_end, _ = stage1
  losses = read_losses(previous)
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5, losses
  for stage in (2, 3):
    workdir = tmp_path / f"stage{stage}"
    trainer = trainer_for(stage_config(stage, previous), workdir)
    start = jax.device_get(trainer.initial_state())
    # Every parameter carried over exactly; the step and optimizer state start afresh.
    assert int(start.step) == 0
    assert not any(np.any(x) for x in jax.tree.leaves(start.opt_state[1][0].mu))
    before, after = flat_params(previous_end), flat_params(start)
    assert before.keys() == after.keys()
    for key in before:
      np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    fresh = jax.device_get(trainer.factory.create(jax.random.key(0)))
    fresh_loss, loaded_loss = first_batch_losses(trainer, fresh, start)
    end = jax.device_get(trainer.run())
    losses = read_losses(workdir)
    assert losses[0] < fresh_loss - 1.0 and loaded_loss < fresh_loss - 1.0, (
        stage, losses[0], loaded_loss, fresh_loss)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2, (stage, losses)
    # Base weights (frozen ViT and LLaMA) are bit-identical after each stage's training.
    for x, y in zip(jax.tree.leaves(previous_end.frozen), jax.tree.leaves(end.frozen)):
      np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y)
               for x, y in zip(jax.tree.leaves(previous_end.params), jax.tree.leaves(end.params)))
    previous, previous_end = workdir, end
  # A stage resumes its own checkpoint (after a kill) rather than re-reading init_from.
  resumed = trainer_for(stage_config(3, tmp_path / "stage2"), tmp_path / "stage3")
  assert int(resumed.initial_state().step) == STEPS


def test_parameters_missing_from_the_checkpoint_keep_their_initialisation(stage1, tmp_path):
  _, end, trainer = stage1
  # A checkpoint without the value projections' LoRA, as if that run had adapted q only.
  without_value = lambda tree: traverse_util.unflatten_dict(
      {k: v for k, v in traverse_util.flatten_dict(tree, sep="/").items()
       if "/value/lora_" not in k}, sep="/")
  manager = ocp.CheckpointManager(tmp_path / "checkpoints", item_names=("state",))
  manager.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(
      end.replace(params=without_value(end.params)))))
  manager.wait_until_finished()
  with trainer.mesh_context():
    state = flat_params(jax.device_get(
        init_from.initial_state(str(tmp_path), trainer.factory, jax.random.key(0))))
    fresh = flat_params(jax.device_get(trainer.factory.create(jax.random.key(0))))
  saved = flat_params(end)
  new = {k for k in state if "/value/lora_" in k}
  assert len(new) == 2 and state.keys() == saved.keys()
  for key in state:
    np.testing.assert_array_equal(state[key], fresh[key] if key in new else saved[key], key)
  assert not np.array_equal(state[sorted(new)[0]], saved[sorted(new)[0]])  # lora_a: trained


def test_a_checkpoint_that_does_not_fit_is_a_clear_error(stage1, tmp_path):
  workdir, end, _ = stage1
  target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat_params(end).items()}
  key = "lm/layers/layers/self_attention/query/lora_a"
  target[key] = jax.ShapeDtypeStruct(target[key].shape[:-1] + (4,), np.float32)
  with pytest.raises(params.CheckpointParamsError,
                     match=rf"'{key}' has shape \(2, 128, 8\) there but \(2, 128, 4\)"):
    params.read_checkpoint(str(workdir), target)
  with pytest.raises(params.CheckpointParamsError, match="nowhere.*no finished checkpoint"):
    params.read_checkpoint(str(tmp_path / "nowhere"), target)
  # Another family's run shares no parameter path with this model.
  simvlm = config_lib.load_config(os.path.join(REPO, "configs", "simvlm.py:tiny"),
                                  [("init_from", str(workdir)), ("mesh.shape", "(1, 1, 1)")])
  with pytest.raises(init_from.InitFromError,
                     match="config.init_from=.*none of its parameter paths"):
    trainer_for(simvlm, tmp_path / "simvlm").initial_state()
