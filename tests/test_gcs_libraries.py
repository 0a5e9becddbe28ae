"""What each library a pod job uses does with gs:// paths, against a real GCS API on localhost:
ArrayRecord shards read in place (and through grain's worker processes), tensorboardX events,
JAX's persistent compilation cache, a webdataset tar streamed, and Apache Beam's GCS IO."""
import io
import os
import subprocess
import sys
import tarfile

import grain
import numpy as np
import pytest
from absl import flags
from array_record.python import array_record_module
from array_record.python.array_record_data_source import ArrayRecordDataSource

from vlm_jax import storage


@pytest.fixture
def shards(tmp_path, gcs_dir):
  """The same 3 ArrayRecord shards of 50 records on local disk and in gs://."""
  local, remote = [], []
  for i in range(3):
    path = str(tmp_path / f"train-{i:05d}.array_record")
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for j in range(50):
      writer.write(f"shard {i} record {j} ".encode() * (j + 1))
    writer.close()
    local.append(path)
    remote.append(f"{gcs_dir}/{os.path.basename(path)}")
    storage.copy(path, remote[-1])
  return local, remote


def test_array_record_reads_gcs_shards_in_place_like_local_ones(shards):
  local, remote = shards
  on_disk, in_gcs = ArrayRecordDataSource(local), ArrayRecordDataSource(remote)
  assert len(in_gcs) == len(on_disk) == 150
  indices = [0, 49, 50, 149, 77, 3]
  assert in_gcs.__getitems__(indices) == on_disk.__getitems__(indices)
  assert in_gcs[120] == on_disk[120]


def test_array_record_cannot_write_to_gcs_so_shards_are_staged_locally(gcs_dir):
  direct = array_record_module.ArrayRecordWriter(f"{gcs_dir}/direct.array_record",
                                                 "group_size:1")
  assert not direct.ok()  # it opens gs:// paths as local files
  with pytest.raises(RuntimeError, match="No such file or directory; opening gs://"):
    direct.write(b"record")
  with storage.staged_write(f"{gcs_dir}/staged.array_record") as local:
    writer = array_record_module.ArrayRecordWriter(local, "group_size:1")
    writer.write(b"record")
    writer.close()
  assert ArrayRecordDataSource([f"{gcs_dir}/staged.array_record"])[0] == b"record"


def test_grain_worker_processes_read_gcs_shards_in_the_local_order(shards):
  flags.FLAGS.mark_as_parsed()  # grain workers read absl flags (DESIGN.md)
  local, remote = shards

  def records(paths, workers):
    dataset = grain.MapDataset.source(ArrayRecordDataSource(paths)).shuffle(seed=7)
    dataset = dataset.to_iter_dataset()
    if workers:
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return list(dataset)

  reference = records(local, 0)
  assert sorted(reference) == sorted(ArrayRecordDataSource(local).__getitems__(range(150)))
  assert records(remote, 2) == reference  # workers inherit the emulator's environment


_TENSORBOARD = """
import sys
from tensorboardX import SummaryWriter
writer = SummaryWriter(sys.argv[1])
for step in range(5):
  writer.add_scalar("train/loss", 1.0 / (step + 1), step)
writer.flush()  # tensorboardX re-uploads the whole file on each flush
for step in range(5, 8):
  writer.add_scalar("train/loss", 1.0 / (step + 1), step)
writer.close()
"""


def test_tensorboardx_writes_event_files_to_gcs_itself(gcs_dir):
  # In a process of its own, as in training: tensorboardX's GCS writer uploads once more when
  # it is garbage-collected, which must happen while the server is up.
  subprocess.run([sys.executable, "-c", _TENSORBOARD, f"{gcs_dir}/tensorboard"], check=True)
  [events] = storage.glob(f"{gcs_dir}/tensorboard/events.out.tfevents.*")
  import tensorflow as tf  # an independent reader  # pylint: disable=g-import-not-at-top
  with storage.local_copy(events) as local:
    scalars = [(e.step, v.simple_value) for e in tf.compat.v1.train.summary_iterator(local)
               for v in e.summary.value if v.tag == "train/loss"]
  assert [s for s, _ in scalars] == list(range(8))
  np.testing.assert_allclose([v for _, v in scalars], [1 / (s + 1) for s in range(8)],
                             rtol=1e-6)


_COMPILE = """
import sys, jax, jax.numpy as jnp
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(1) if event == "/jax/compilation_cache/cache_hits" else 0)
def f(x):
  for _ in range(8):
    x = jnp.tanh(x @ x.T)
  return x.sum()
print(float(jax.jit(f)(jnp.ones((32, 32)))), len(hits))
"""


def test_jax_persistent_compilation_cache_lives_in_gcs(gcs_dir):
  cache = f"{gcs_dir}/jax_cache"
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": ""}  # the conftest's local cache is off
  run = lambda: subprocess.run([sys.executable, "-c", _COMPILE, cache], env=env, check=True,
                               capture_output=True, text=True).stdout.split()
  first_value, first_hits = run()
  assert int(first_hits) == 0
  assert any(name.startswith("jit_f-") for name in storage.listdir(cache))
  second_value, second_hits = run()  # a restarted job: the executable comes from gs://
  assert int(second_hits) >= 1 and second_value == first_value


def test_a_webdataset_tar_streams_from_gcs(tmp_path, gcs_dir):
  members = {f"{k:06d}.{ext}": os.urandom(1000 + 37 * k) for k in range(20)
             for ext in ("jpg", "txt")}
  local = tmp_path / "shard.tar"
  with tarfile.open(local, "w") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  storage.copy(str(local), f"{gcs_dir}/shard.tar")
  with storage.open(f"{gcs_dir}/shard.tar", "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
    streamed = {m.name: tar.extractfile(m).read() for m in tar}
  assert streamed == members


def test_beam_reads_gcs_through_the_emulator_and_our_dofns_write_through_storage(gcs_dir):
  # pylint: disable=g-import-not-at-top
  import apache_beam as beam
  from apache_beam.io.filesystems import FileSystems
  from apache_beam.options.pipeline_options import PipelineOptions
  for i in range(2):
    storage.write_atomic(f"{gcs_dir}/in/part-{i}.txt", "".join(f"{i}-{j}\n" for j in range(5)))
  matched = FileSystems.match([f"{gcs_dir}/in/*.txt"])[0].metadata_list
  assert sorted(m.path for m in matched) == [f"{gcs_dir}/in/part-{i}.txt" for i in range(2)]

  class WriteShard(beam.DoFn):  # as ingest's ShardWriter: one object per shard

    def process(self, shard_and_lines):
      shard, lines = shard_and_lines
      storage.write_atomic(f"{gcs_dir}/out/shard-{shard}.txt", "".join(sorted(lines)))

  with beam.Pipeline(options=PipelineOptions(["--runner=DirectRunner"])) as pipeline:
    _ = (pipeline | beam.io.ReadFromText(f"{gcs_dir}/in/*.txt")
         | beam.Map(lambda line: (int(line[0]), line.upper() + "\n")) | beam.GroupByKey()
         | beam.ParDo(WriteShard()))
  assert storage.listdir(f"{gcs_dir}/out") == ["shard-0.txt", "shard-1.txt"]
  assert storage.read_text(f"{gcs_dir}/out/shard-1.txt") == "".join(
      f"1-{j}\n".upper() for j in range(5))
