"""One tiny run with a profile and a Weights & Biases writer (offline): the trace loads in the
profiler's reader with the traced steps in it, and W&B recorded what metrics.jsonl did."""
import glob
import json
import os
import struct

import pytest
from jax.profiler import ProfileData
from wandb.proto import wandb_internal_pb2

from test_train import tiny_config  # noqa: F401  (tests/ is on sys.path)
from vlm_jax.train import loop, profiling, wandb_writer

STEPS = 6


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp("run")
  config = tiny_config(num_train_steps=str(STEPS), **{
      "profile.steps": "(3, 4)", "wandb.mode": "offline", "wandb.project": "vlm_jax_tests",
      "checkpoint.every_steps": "5"})
  loop.train(config, str(path))
  return path


def test_the_profiled_steps_are_in_a_trace_the_profiler_loads(workdir):
  traces = profiling.traces(str(workdir))
  assert len(traces) == 1, traces  # steps 3 and 4: one trace
  assert traces[0].startswith(str(workdir / "tensorboard" / "profiles" / "process_0"))
  plane = ProfileData.from_file(traces[0]).find_plane_with_name("/host:CPU")
  events = [e for line in plane.lines for e in line.events]
  steps = sorted(dict(e.stats)["step_num"] for e in events if e.name == "train")
  assert steps == [3, 4]
  assert any(e.name == "PjitFunction(train_step)" for e in events)  # the step ran in it


def read_wandb_history(path) -> dict:
  """{step: {key: value}} from a .wandb file: W&B's LevelDB-style log (32 KiB blocks of
  records with a 7-byte header: CRC, length, type) of protobuf Records after a 7-byte file
  header (':W&B', version)."""
  data = open(path, "rb").read()
  assert data[:4] == b":W&B"
  rows, pos, pending, block = {}, 7, b"", 32768
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # a block's tail too short for a header is padding
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    pending += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):  # a full record, or the last piece of one
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      pending = b""
      if record.WhichOneof("record_type") == "history":
        items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                 for i in record.history.item}
        rows.setdefault(record.history.step.num, {}).update(items)
  return rows


def test_wandb_offline_records_the_scalars_of_metrics_jsonl(workdir):
  run, = glob.glob(str(workdir / "wandb" / "offline-run-*"))
  assert run.endswith(wandb_writer.run_id(str(workdir)))
  history = read_wandb_history(os.path.join(run, f"run-{wandb_writer.run_id(str(workdir))}.wandb"))
  expected = {}
  with open(workdir / "metrics.jsonl") as f:
    for line in f:
      record = json.loads(line)
      expected.setdefault(record.pop("step"), {}).update(record)
  assert sorted(history) == sorted(expected) == list(range(1, STEPS + 1))
  for step, scalars in expected.items():
    logged = {k: v for k, v in history[step].items() if not k.startswith("_")}
    assert logged.keys() == scalars.keys(), step
    for key, value in scalars.items():
      assert logged[key] == pytest.approx(value, rel=1e-6), (step, key)
  assert "loss" in expected[STEPS] and "goodput" in expected[STEPS]
