"""Every input format: fixture in the real layout -> ingest -> records read back."""
import glob
import json
import os

import numpy as np
import pytest

from vlm_jax import config as config_lib
from vlm_jax.data import ingest, pipeline
from vlm_jax.data.sources import arrayrecord, webdataset
from vlm_jax.data.synthetic import formats as synthetic_formats
from vlm_jax.inspection import data as data_insp


def _records(directory):
  source = arrayrecord.ArrayRecordSource(glob.glob(os.path.join(directory, "*.array_record")))
  return [source[i] for i in range(len(source))]


def _pairs_tars(data_dir, split="validation"):
  return os.path.join(data_dir, "synthetic", "pairs", split, "*.tar")


def test_img2dataset_webdataset(data_dir, tmp_path):
  manifest = ingest.run("img2dataset", _pairs_tars(data_dir), str(tmp_path / "out"),
                        shard_size=25)
  wds = webdataset.WebDatasetSource(glob.glob(_pairs_tars(data_dir)))
  got = _records(tmp_path / "out")
  assert manifest["records"] == len(wds) == len(got) and manifest["shards"] == 3
  assert manifest["kind"] == "pairs" and manifest["skipped"] == {}
  assert [(r["key"], r["image"], r["text"]) for r in got] == [
      (wds[i]["key"], wds[i]["image"], wds[i]["text"]) for i in range(len(wds))]


def test_img2dataset_tfrecord(data_dir, tmp_path):
  pytest.importorskip("tensorflow")
  wds = webdataset.WebDatasetSource(glob.glob(_pairs_tars(data_dir)))
  synthetic_formats.write_img2dataset_tfrecord(str(tmp_path / "00000.tfrecord"),
                                               [wds[i] for i in range(len(wds))])
  ingest.run("img2dataset-tfrecord", str(tmp_path / "*.tfrecord"), str(tmp_path / "out"))
  got = _records(tmp_path / "out")
  assert [(r["key"], r["image"], r["text"]) for r in got] == [
      (wds[i]["key"], wds[i]["image"], wds[i]["text"]) for i in range(len(wds))]
  assert json.loads(got[0]["meta"])["url"] == json.loads(wds[0]["meta"])["url"]


def test_text_jsonl(data_dir, tmp_path):
  pattern = os.path.join(data_dir, "synthetic", "text", "validation", "*.jsonl")
  ingest.run("text", pattern, str(tmp_path / "out"))
  lines = [json.loads(l)["text"] for l in open(glob.glob(pattern)[0])]
  assert [r["text"] for r in _records(tmp_path / "out")] == lines


def _check_interleaved(record):
  texts, images = record["texts"], record["images"]
  assert len(texts) == len(images)
  assert all((t is None) != (i is None) for t, i in zip(texts, images))
  assert any(i is not None for i in images) and any(t is not None for t in texts)


@pytest.mark.parametrize("inline", [True, False])
def test_mmc4(tmp_path, inline):
  tar = None if inline else str(tmp_path / "images.tar")
  synthetic_formats.write_mmc4(str(tmp_path / "docs.jsonl"), 30, image_tar_path=tar)
  manifest = ingest.run("mmc4", str(tmp_path / "docs.jsonl"), str(tmp_path / "out"),
                        image_tars=tar or "", max_images=2)
  docs = [json.loads(l) for l in open(tmp_path / "docs.jsonl")]
  got = _records(tmp_path / "out")
  assert manifest["records"] + sum(manifest["skipped"].values()) == len(docs)
  by_key = {r["key"]: r for r in got}
  for number, doc in enumerate(docs):
    kept = [i for i in doc["image_info"] if i["matched_sim"] >= 0.24][:2]
    record = by_key.get(f"docs.jsonl:{number}")
    if not kept:
      assert record is None  # no image above the threshold: skipped and counted
      continue
    _check_interleaved(record)
    assert [t for t in record["texts"] if t] == doc["text_list"]
    # each image sits right before its matched sentence
    positions = [i for i, image in enumerate(record["images"]) if image is not None]
    assert len(positions) == len(kept)
    for position, info in zip(positions, kept):
      following = next(t for t in record["texts"][position:] if t is not None)
      assert following == doc["text_list"][info["matched_text_index"]]


@pytest.mark.parametrize("inline", [True, False])
def test_obelics(tmp_path, inline):
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  tar = None if inline else str(tmp_path / "images.tar")
  synthetic_formats.write_obelics(str(tmp_path / "docs.parquet"), 12, image_tar_path=tar)
  manifest = ingest.run("obelics", str(tmp_path / "docs.parquet"), str(tmp_path / "out"),
                        image_tars=tar or "", max_images=30)
  rows = pq.read_table(tmp_path / "docs.parquet").to_pylist()
  got = _records(tmp_path / "out")
  assert manifest["records"] == len(rows) == len(got)
  for row, record in zip(rows, got):
    _check_interleaved(record)
    assert record["texts"] == row["texts"]
    assert [i is None for i in record["images"]] == [i is None for i in row["images"]]


def test_synthetic_interleaved_files_ingest(data_dir, sizes, tmp_path):
  root = os.path.join(data_dir, "synthetic", "interleaved", "train")
  a = ingest.run("mmc4", os.path.join(root, "mmc4.jsonl"), str(tmp_path / "m"))
  b = ingest.run("obelics", os.path.join(root, "obelics.parquet"), str(tmp_path / "o"))
  assert a["records"] > 0.5 * sizes.train_interleaved
  assert b["records"] == sizes.train_interleaved


def test_train_from_ingested_directory(data_dir, data_config, tmp_path):
  ingest.run("img2dataset", _pairs_tars(data_dir, "train"), str(tmp_path / "pairs"))
  data_config.mixture = str(tmp_path / "pairs")
  it = pipeline.make_train_iterator(data_config, "simvlm", global_batch_size=4, seed=0,
                                    process_index=0, process_count=1)
  batch = next(it)
  assert batch["images"].shape == (4, 1, 32, 32, 3) and batch["image_mask"].all()


def test_refuses_to_replace_foreign_directory(data_dir, tmp_path):
  (tmp_path / "precious").mkdir()
  (tmp_path / "precious" / "thesis.tex").write_text("x")
  with pytest.raises(FileExistsError):
    ingest.run("img2dataset", _pairs_tars(data_dir), str(tmp_path / "precious"))


def test_inspect_prints_examples_and_proportions(data_config):
  config = config_lib.load_config("configs/simvlm.py:tiny")
  config.data = data_config
  lines = data_insp.stream_lines(config, 2, mixture_examples=1000)
  assert lines[0].startswith("[0] <image 32x32") and "|" in lines[0]
  assert any("realised" in l for l in lines)
  shares = {l.split()[0]: float(l.split()[-1]) for l in lines if l.startswith("  ")}
  assert np.isclose(shares["synthetic_pairs"], 0.8, atol=0.02), lines
