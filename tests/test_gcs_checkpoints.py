"""Orbax checkpoints of a sharded train-state-like tree and a grain iterator in a gs:// workdir
(a real GCS API on localhost): commit marker, cut-off saves, damaged objects, moving aside."""
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from vlm_jax import storage


def _state(scale: float):
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  w = np.arange(64 * 32, dtype=np.float32).reshape(64, 32) * scale
  return {"w": jax.device_put(w, NamedSharding(mesh, P("data", "model"))),
          "step": jax.device_put(np.int32(scale), NamedSharding(mesh, P()))}


def _data_iterator():
  return iter(grain.MapDataset.range(1000).shuffle(seed=3).to_iter_dataset())


def _manager(directory):
  return ocp.CheckpointManager(
      directory, item_names=("state", "data"),
      options=ocp.CheckpointManagerOptions(max_to_keep=5, enable_async_checkpointing=True,
                                           cleanup_tmp_directories=True))


def _restore(manager, step, data_iterator):
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state(1.0))
  return manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract),
      data=grain.checkpoint.CheckpointRestore(data_iterator)))["state"]


@pytest.fixture
def checkpoints(gcs_dir):
  """gs://.../checkpoints with steps 1, 2, 3; the data iterator is 10 * step elements in."""
  directory = f"{gcs_dir}/checkpoints"
  manager, data = _manager(directory), _data_iterator()
  for step in (1, 2, 3):
    for _ in range(10):
      next(data)
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_state(float(step))),
        data=grain.checkpoint.CheckpointSave(data)))
  manager.wait_until_finished()
  manager.close()
  return directory


def test_sharded_state_and_data_position_restore_from_gcs(checkpoints):
  # GCS has no atomic rename: orbax writes each step in place and commits it last with a
  # marker object, so no "*.orbax-checkpoint-tmp*" name ever appears.
  assert storage.listdir(checkpoints) == ["1", "2", "3"]
  for step in ("1", "2", "3"):
    assert storage.exists(f"{checkpoints}/{step}/commit_success.txt")
  manager, data = _manager(checkpoints), _data_iterator()
  state = _restore(manager, 2, data)
  np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(_state(2.0)["w"]))
  assert state["w"].sharding.spec == P("data", "model") and int(state["step"]) == 2
  expected = _data_iterator()
  for _ in range(20):
    next(expected)
  assert [next(data) for _ in range(5)] == [next(expected) for _ in range(5)]


def test_a_step_without_its_commit_marker_is_a_cut_off_save_and_is_deleted(checkpoints):
  # What a save killed before its commit leaves: every object but the marker.
  storage.remove(f"{checkpoints}/3/commit_success.txt")
  assert ocp.path.step.is_path_temporary(storage.as_path(f"{checkpoints}/3"))
  assert not ocp.path.step.is_path_temporary(storage.as_path(f"{checkpoints}/2"))
  manager = _manager(checkpoints)
  assert manager.latest_step() == 2
  assert storage.listdir(checkpoints) == ["1", "2"]


def test_a_damaged_object_fails_its_restore_and_the_step_can_be_moved_aside(checkpoints):
  arrays = [p for p in storage.glob(f"{checkpoints}/3/state/**") if not storage.isdir(p)]
  largest = max(arrays, key=storage.size)
  data = storage.read_bytes(largest)
  storage.write_atomic(largest, data[:len(data) // 2])  # an upload that gave up halfway
  manager = _manager(checkpoints)
  # tensorstore names the short object: "Requested byte range [0, n) was not satisfied ...".
  with pytest.raises(ValueError, match=f"(?i)byte range.*{largest.rsplit('/', 1)[1]}"):
    _restore(manager, 3, _data_iterator())
  state = _restore(manager, 2, _data_iterator())
  np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(_state(2.0)["w"]))
  # vlm_jax.train.checkpoint keeps damaged steps for inspection under damaged_checkpoints/.
  aside = checkpoints.replace("/checkpoints", "/damaged_checkpoints/3")
  storage.move(f"{checkpoints}/3", aside)
  manager.reload()
  assert manager.all_steps() == [1, 2]
  assert storage.read_bytes(aside + largest[len(f"{checkpoints}/3"):]) == data[:len(data) // 2]
