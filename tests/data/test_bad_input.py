"""Bad input is skipped and counted, warned about by shard and key, and fatal in bulk."""
import io
import json
import logging
import os
import tarfile

import pytest
from PIL import Image

from vlm_jax.data import catalog, health, ingest, pipeline
from vlm_jax.data.families import simvlm
from vlm_jax.data.sources import webdataset
from vlm_jax.data.synthetic import formats


def _jpeg(size=16, colour=(200, 30, 30)):
  buf = io.BytesIO()
  Image.new("RGB", (size, size), colour).save(buf, format="JPEG")
  return buf.getvalue()


def _bomb():
  """Small file, huge canvas: 4000x4000 of one colour compresses to a few KB as PNG."""
  buf = io.BytesIO()
  Image.new("L", (4000, 4000), 0).save(buf, format="PNG")
  return buf.getvalue()


def _add(tar, name, payload):
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  tar.addfile(info, io.BytesIO(payload))


def _pair(tar, key, image=None, caption="a red square in the centre", meta=True):
  if image is not None:
    _add(tar, f"{key}.jpg", image)
  if caption is not None:
    _add(tar, f"{key}.txt", caption.encode())
  if meta:
    _add(tar, f"{key}.json", json.dumps({"key": key, "url": "x", "status": "success"}).encode())


BAD_PAIRS = {
    "corrupt": b"\xff\xd8\xff\xe0 definitely not a jpeg",
    "truncated": _jpeg(64)[:200],
    "zero_bytes": b"",
    "bomb": _bomb(),
}


def _write_shard(path, good=40):
  """`good` usable pairs plus one of each bad case; the last member is truncated."""
  with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
    for i in range(good):
      _pair(tar, f"00000{i:04d}", _jpeg())
    for i, image in enumerate(BAD_PAIRS.values()):
      _pair(tar, f"bad{i:02d}", image)
    _pair(tar, "nocaption", _jpeg(), caption=None)  # json without caption either
    _add(tar, "../escape.jpg", _jpeg())
    _add(tar, "../escape.txt", b"climbing out")
    _add(tar, "/abs/rooted.jpg", _jpeg())
    _add(tar, "/abs/rooted.txt", b"absolute")
    _pair(tar, "cutshort", _jpeg(64), meta=False)
  data = open(path, "rb").read()
  # Drop the tar's end blocks and half of the last member (cutshort.txt).
  end = data.rindex(b"a red square") + 5
  with open(path, "wb") as f:
    f.write(data[:end])
  return 8  # bad records in the shard


def _as_task(monkeypatch, spec):
  """`spec` as one of SimVLM's tasks, for this test only."""
  monkeypatch.setattr(simvlm, "TASKS", (spec,), raising=False)
  return spec


@pytest.fixture
def bad_task(tmp_path, data_config, monkeypatch):
  shard = str(tmp_path / "00000.tar")
  num_bad = _write_shard(shard)
  spec = _as_task(monkeypatch, catalog.TaskSpec(f"bad_{tmp_path.name}", "pairs", "webdataset",
                                                str(tmp_path / "*.tar")))
  data_config.mixture = spec.name
  data_config.max_pixels = 1_000_000
  data_config.max_bad_fraction = 0.5
  return shard, num_bad


def test_pipeline_skips_and_counts(bad_task, data_config, caplog):
  shard, num_bad = bad_task
  data_config.warn_every_s = 0.0
  it = pipeline.make_train_iterator(data_config, "simvlm", global_batch_size=40, seed=0,
                                    process_index=0, process_count=1)
  with caplog.at_level(logging.WARNING):
    next(it)
    next(it)
  counts = pipeline.skipped_record_counts(it)
  assert counts["examples"] == 80
  # every record once in the first 48 of the stream: all bad ones were skipped and counted
  assert counts["skipped_records"] >= num_bad
  reasons = " ".join(r.getMessage() for r in caplog.records)
  assert shard in reasons
  for why in ("undecodable image", "empty image", "exceeds", "missing text",
              "unsafe member name '../escape", "unsafe member name '/abs/rooted",
              "truncated member"):
    assert why in reasons, why


def test_warnings_are_rate_limited(bad_task, data_config, caplog):
  data_config.warn_every_s = 3600.0
  it = pipeline.make_train_iterator(data_config, "simvlm", global_batch_size=40, seed=0,
                                    process_index=0, process_count=1)
  with caplog.at_level(logging.WARNING):
    next(it)
    next(it)
  assert len([r for r in caplog.records if "skipped bad record" in r.getMessage()]) == 1


def test_too_many_bad_records_names_the_source(bad_task, data_config):
  shard, _ = bad_task
  data_config.bad_window = 20
  data_config.max_bad_fraction = 0.05
  it = pipeline.make_train_iterator(data_config, "simvlm", global_batch_size=40, seed=0,
                                    process_index=0, process_count=1)
  with pytest.raises(Exception, match=shard):
    for _ in range(5):
      next(it)


def test_ingest_counts_every_bad_case(bad_task, tmp_path):
  shard, num_bad = bad_task
  manifest = ingest.run("img2dataset", shard, str(tmp_path / "out"), max_pixels=1_000_000,
                        max_bad_fraction=0.5)
  assert manifest["records"] == 40
  assert sum(manifest["skipped"].values()) == num_bad
  with pytest.raises(health.TooManyBadRecords, match="00000.tar"):
    ingest.run("img2dataset", shard, str(tmp_path / "out2"), max_bad_fraction=0.05)


def test_malformed_json_lines(tmp_path):
  path = tmp_path / "docs.jsonl"
  path.write_text('{"text": "fine"}\n{"text": \n{"no_text": 1}\n{"text": 3}\n\n{"text": "ok"}\n')
  manifest = ingest.run("text", str(path), str(tmp_path / "out"), max_bad_fraction=0.9)
  assert manifest["records"] == 2 and sum(manifest["skipped"].values()) == 3


def test_pipeline_skips_malformed_text_lines(tmp_path, data_config, monkeypatch):
  path = tmp_path / "docs.jsonl"
  path.write_text("".join('{"text": "a cat sees the red ball."}\n' if i % 10 else "{oops\n"
                          for i in range(100)))
  spec = _as_task(monkeypatch, catalog.TaskSpec("bad_text", "text", "jsonl", str(path)))
  data_config.mixture = spec.name
  it = pipeline.make_train_iterator(data_config, "simvlm", global_batch_size=45, seed=0,
                                    process_index=0, process_count=1)
  next(it)
  next(it)
  assert pipeline.skipped_record_counts(it)["skipped_records"] == 10


def test_interleaved_documents_without_image_or_text(tmp_path):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  image = _jpeg()
  rows = [
      {"texts": ["hello", None], "images": [None, image]},  # good
      {"texts": ["only text"], "images": [None]},  # no image
      {"texts": [None], "images": [image]},  # no text
      {"texts": ["x", None], "images": [None, b"broken"]},  # its only image is corrupt
      {"texts": ["x", "y"], "images": [image, None]},  # two non-nulls at position 0
      {"texts": ["x"], "images": [None, image]},  # lengths differ
  ]
  schema = pa.schema([("texts", pa.list_(pa.string())), ("images", pa.list_(pa.binary()))])
  pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "o.parquet")
  manifest = ingest.run("obelics", str(tmp_path / "o.parquet"), str(tmp_path / "out"),
                        max_bad_fraction=0.99)
  assert manifest["records"] == 1 and sum(manifest["skipped"].values()) == 5
  assert manifest["dropped_images"] == 1

  lines = [
      {"text_list": ["a", "b"], "image_info": []},  # no image
      {"text_list": ["a"], "image_info": [{"image_name": "x.jpg", "matched_text_index": 0,
                                           "matched_sim": 0.9}]},  # image not found
      {"text_list": [], "image_info": [{"image_base64": "aGVsbG8=", "matched_text_index": 0,
                                        "matched_sim": 0.9}]},  # no text
  ]
  (tmp_path / "m.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines) + "{bad\n")
  manifest = ingest.run("mmc4", str(tmp_path / "m.jsonl"), str(tmp_path / "out2"),
                        max_bad_fraction=1.0)
  assert manifest["records"] == 0 and sum(manifest["skipped"].values()) == 4


def test_truncated_tfrecord(data_dir, tmp_path):
  pytest.importorskip("tensorflow")
  tars = sorted(os.path.join(data_dir, "synthetic", "pairs", "validation", p)
                for p in os.listdir(os.path.join(data_dir, "synthetic", "pairs", "validation"))
                if p.endswith(".tar"))
  wds = webdataset.WebDatasetSource(tars)
  path = str(tmp_path / "00000.tfrecord")
  formats.write_img2dataset_tfrecord(path, [wds[i] for i in range(20)])
  data = open(path, "rb").read()
  open(path, "wb").write(data[:len(data) - 300])
  manifest = ingest.run("img2dataset-tfrecord", path, str(tmp_path / "out"),
                        max_bad_fraction=0.5)
  assert manifest["records"] == 19 and sum(manifest["skipped"].values()) == 1


@pytest.mark.parametrize("fmt,name", [("img2dataset", "00001.tar"), ("text", "a.jsonl"),
                                      ("obelics", "a.parquet"), ("mmc4", "b.jsonl")])
def test_zero_byte_files_are_counted(tmp_path, fmt, name):
  (tmp_path / name).write_bytes(b"")
  manifest = ingest.run(fmt, str(tmp_path / name), str(tmp_path / "out"), max_bad_fraction=1.0)
  assert manifest["records"] == 0 and manifest["skipped"] == {"zero-byte file": 1}


def test_zero_byte_shard_in_training(bad_task, data_config):
  shard, num_bad = bad_task
  open(os.path.join(os.path.dirname(shard), "00001.tar"), "wb").close()
  it = pipeline.make_train_iterator(data_config, "simvlm", global_batch_size=41, seed=0,
                                    process_index=0, process_count=1)
  next(it)
  next(it)
  assert pipeline.skipped_record_counts(it)["skipped_records"] >= num_bad + 1


def test_skipped_counts_reach_the_training_metrics(bad_task, data_config, tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  from vlm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from vlm_jax.train import loop  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  config = config_lib.load_config(os.path.join(root, "configs", "simvlm.py") + ":tiny", [
      ("batch_size", "8"), ("num_train_steps", "4"), ("log_every_steps", "2"),
      ("checkpoint.async_save", "False")])
  config.data = data_config
  loop.train(config, str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    logged = [json.loads(line) for line in f]
  assert [m["data/examples"] for m in logged] == [16, 32]
  # 32 of the shard's 48 records were drawn; its 8 bad ones were skipped as they came up.
  assert 0 < logged[-1]["data/skipped_records"] <= bad_task[1]
  assert logged[0]["data/skipped_records"] <= logged[-1]["data/skipped_records"]
