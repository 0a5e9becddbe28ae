"""Data in gs:// (a real GCS API on localhost): sample data generated there byte for byte as on
disk; the pipeline over webdataset tars and jsonl (ranged reads) and over ingested ArrayRecord
shards (read in place) gives the batches of local disk and resumes exactly from a saved state,
also with grain worker processes; `vlm-data ingest` of the dirty img2dataset fixture from
gs:// to gs://, local and Beam runners, writes the bytes of the local-disk ingest; the
Dataflow options are checked and the job request is built without submitting it."""
import json
import os
import re
import tarfile

import fsspec
import numpy as np
import pytest

from test_bad_input import _jpeg, _pair, _write_shard  # pylint: disable=g-bad-import-order
from vlm_jax import storage
from vlm_jax.cli import data as cli
from vlm_jax.data import ingest, pipeline
from vlm_jax.data.ingest import local as ingest_local
from vlm_jax.data.synthetic import sample_data

OPTIONS = dict(shard_size=16, max_bad_fraction=0.9, max_pixels=1_000_000)


def _relative_files(root):
  if storage.is_gcs(root):
    return sorted(p[len(root) - len("gs://") + 1:] for p in fsspec.filesystem("gs").find(root))
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, _, files in os.walk(root) for f in files)


@pytest.fixture(scope="module")
def gcs_data(gcs, data_dir, sizes):
  """A gs:// data dir generated with the local one's sizes."""
  root = f"gs://vlm-test/{os.urandom(6).hex()}"
  sample_data.ensure_sample_data(root, sizes)
  return root


def test_sample_data_generated_into_gcs_is_the_local_data(data_dir, gcs_data):
  local, remote = (sample_data.synthetic_dir(d) for d in (data_dir, gcs_data))
  # Not the caches the local tests added since.
  files = [f for f in _relative_files(local) if ".ingested" not in f]
  assert files == _relative_files(remote)
  for name in files:
    if not name.endswith(".json"):  # the data; the json files hold timings
      assert storage.read_bytes(f"{remote}/{name}") == storage.read_bytes(f"{local}/{name}"), name


def _batches(data_config, n, state=None):
  it = pipeline.make_train_iterator(data_config, "simvlm", global_batch_size=8, seed=0,
                                    process_index=0, process_count=1)
  if state is not None:
    it.set_state(state)
  batches = [next(it) for _ in range(n)]
  return it, batches


def _assert_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _same_batches_and_exact_resume(local_config, gcs_config):
  local_it, local = _batches(local_config, 4)
  gcs_it, remote = _batches(gcs_config, 2)
  state = gcs_it.get_state()
  remote += [next(gcs_it) for _ in range(2)]
  _assert_equal(local, remote)
  resumed_it, resumed = _batches(gcs_config, 2, state)  # a new process's iterator
  _assert_equal(resumed, local[2:])
  for it in (local_it, gcs_it, resumed_it):
    it.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_tars_and_jsonl_in_gcs_give_the_local_batches_and_resume_exactly(data_config, gcs_data,
                                                                        workers):
  data_config.num_workers = workers
  gcs_config = data_config.copy_and_resolve_references()
  gcs_config.data_dir = gcs_data
  _same_batches_and_exact_resume(data_config, gcs_config)


def test_ingested_shards_in_gcs_give_the_local_batches_and_resume_exactly(data_dir, gcs_data,
                                                                         data_config, tmp_path):
  pattern = os.path.join(sample_data.synthetic_dir(data_dir), "pairs", "train", "*.tar")
  local = str(tmp_path / "pairs")
  ingest.run("img2dataset", pattern, local, shard_size=200)
  remote = f"{gcs_data}/pairs"
  ingest.run("img2dataset", f"{sample_data.synthetic_dir(gcs_data)}/pairs/train/*.tar",
             remote, shard_size=200)
  data_config.num_workers = 2
  gcs_config = data_config.copy_and_resolve_references()
  data_config.mixture, gcs_config.mixture = local, remote
  _same_batches_and_exact_resume(data_config, gcs_config)


@pytest.fixture(scope="module")
def dirty_input(gcs, tmp_path_factory):
  """(local glob, gs:// glob) of the same two img2dataset tars: the bad-input tests' dirty
  shard (40 good records and 8 bad ones of every kind) and 20 good records."""
  local = tmp_path_factory.mktemp("dirty")
  _write_shard(str(local / "00000.tar"))
  with tarfile.open(local / "00001.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
    for i in range(20):
      _pair(tar, f"clean{i:04d}", _jpeg(colour=(i * 10, 90, 30)), caption=f"a square {i}")
  remote = f"gs://vlm-test/{os.urandom(6).hex()}/input"
  storage.put_tree(str(local), remote)
  return str(local / "*.tar"), f"{remote}/*.tar"


def _shards(directory):
  return sorted(n for n in storage.listdir(directory) if n.endswith(".array_record"))


@pytest.mark.parametrize("runner", ["local", "beam"])
def test_ingest_from_gcs_to_gcs_writes_the_records_of_a_local_ingest(dirty_input, tmp_path,
                                                                    runner):
  local_input, gcs_input = dirty_input
  local_out = str(tmp_path / "local")
  gcs_out = f"gs://vlm-test/{os.urandom(6).hex()}/pairs"
  on_disk = ingest.run("img2dataset", local_input, local_out, **OPTIONS)
  beam_options = ["direct_num_workers=2", "direct_running_mode=multi_processing"]
  in_gcs = ingest.run("img2dataset", gcs_input, gcs_out, runner=runner,
                      beam_options=beam_options if runner == "beam" else (), **OPTIONS)
  assert _shards(gcs_out) == _shards(local_out) == ["00000.array_record", "00001.array_record",
                                                    "00002.array_record", "00003.array_record"]
  for name in _shards(local_out):
    assert storage.read_bytes(f"{gcs_out}/{name}") == storage.read_bytes(
        f"{local_out}/{name}"), name
  assert ingest_local.read_statistics(gcs_out) == ingest_local.read_statistics(local_out)
  assert in_gcs["records"] == on_disk["records"] == 60
  assert in_gcs["skipped"] == on_disk["skipped"] and sum(on_disk["skipped"].values()) == 8
  assert in_gcs["inputs"] == [f"{gcs_input[:-6]}/0000{i}.tar" for i in range(2)]
  assert json.loads(storage.read_text(f"{gcs_out}/dataset.json"))["runner"] == runner
  # A second ingest replaces the first in place (GCS has no rename): manifest removed first.
  again = ingest.run("img2dataset", gcs_input, gcs_out, shard_size=64, max_bad_fraction=0.9,
                     max_pixels=1_000_000)
  assert again["shards"] == 1 and _shards(gcs_out) == ["00000.array_record"]


DATAFLOW = {"runner": "DataflowRunner", "project": "my-project", "region": "us-central1",
            "temp_location": "gs://vlm-test/dataflow/tmp",
            "sdk_container_image": "us-docker.pkg.dev/my-project/images/vlm-jax:1"}


def _ingest_argv(input_glob, output, **changes):
  """`vlm-data ingest --runner beam --dry-run` with DATAFLOW's options, `changes` applied
  (None removes an option)."""
  options = {k: v for k, v in {**DATAFLOW, **changes}.items() if v is not None}
  return ["ingest", "--format", "img2dataset", "--input", input_glob, "--output", output,
          "--runner", "beam", "--dry-run",
          *[arg for k, v in options.items() for arg in ("--beam_option", f"{k}={v}")]]


def test_a_dataflow_job_is_built_without_submitting_it(dirty_input, capsys):
  output = f"gs://vlm-test/{os.urandom(6).hex()}/pairs"
  cli.main(_ingest_argv(dirty_input[1], output))
  job = json.loads(capsys.readouterr().out)
  assert job["dry_run"] and job["runner"] == "DataflowRunner" and job["inputs"] == 2
  assert job["job_name"].startswith("beamapp-")
  assert job["steps"][:3] == ["Files", "SpreadFiles", "Read"]
  assert {"WriteShard", "Summary"} <= set(job["steps"])
  assert job["worker_images"] == [DATAFLOW["sdk_container_image"]]
  assert not storage.exists(output)  # nothing written


@pytest.mark.parametrize("changes, message", [
    ({"region": None}, "runner=DataflowRunner needs --beam_option region=..."),
    ({"sdk_container_image": None},
     "Dataflow workers need vlm_jax: --beam_option setup_file=./setup.py"),
    ({"temp_location": "/tmp/df"},
     "--beam_option temp_location=/tmp/df: Dataflow needs a gs:// location"),
])
def test_dataflow_options_that_cannot_work_name_the_flag(dirty_input, changes, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    cli.main(_ingest_argv(dirty_input[1], "gs://vlm-test/out", **changes))


def test_dataflow_workers_need_gcs_data(dirty_input, tmp_path):
  with pytest.raises(ValueError, match=f"--output {tmp_path}/out: Dataflow workers read and "
                     "write gs:// paths only"):
    cli.main(_ingest_argv(dirty_input[1], str(tmp_path / "out")))
