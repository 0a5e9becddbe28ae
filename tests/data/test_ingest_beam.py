"""The Beam ingest (DirectRunner, several workers) against the local ingest: every format,
dirty records, filters, dedup, statistics, determinism across worker counts, experts."""
import collections
import filecmp
import glob
import hashlib
import io
import json
import math
import os
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from vlm_jax.cli import data as cli
from vlm_jax.data import catalog, ingest, pipeline
from vlm_jax.data.ingest import experts as experts_lib
from vlm_jax.data.ingest import filters
from vlm_jax.data.ingest import local as ingest_local
from vlm_jax.data.sources import arrayrecord, webdataset
from vlm_jax.data.synthetic import formats as synthetic_formats
# The dirty-record builders of the bad-input tests (pytest puts tests/data on sys.path).
from test_bad_input import _add, _jpeg, _write_shard  # pylint: disable=g-bad-import-order

SIMILARITY = 0.33  # the sample data's similarity is uniform in [0.28, 0.45]
FILTERS = filters.Filters(min_image_side=16, max_side_ratio=3.0, min_caption_words=1,
                          max_caption_words=30, min_meta=(("similarity", SIMILARITY),),
                          dedup=("image", "url"))
OPTIONS = dict(shard_size=16, max_bad_fraction=0.9, max_pixels=1_000_000, filters=FILTERS)
FORMATS = ("img2dataset", "img2dataset-tfrecord", "text", "mmc4", "obelics")


def _direct(workers, mode):
  return [f"direct_num_workers={workers}", f"direct_running_mode={mode}"]


def _records(directory):
  paths = glob.glob(os.path.join(directory, "*.array_record"))
  if not paths:
    return []
  source = arrayrecord.ArrayRecordSource(paths)
  return [{k: v for k, v in source[i].items() if k != "source"} for i in range(len(source))]


def _shards(directory):
  return sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.array_record")))


def _same_output(a, b):
  assert _shards(a) == _shards(b) and _shards(a)
  for name in _shards(a):
    assert filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False), name
  assert ingest_local.read_statistics(a) == ingest_local.read_statistics(b)


def _wds(data_dir):
  tars = sorted(glob.glob(os.path.join(data_dir, "synthetic", "pairs", "validation", "*.tar")))
  source = webdataset.WebDatasetSource(tars)
  return tars, [source[i] for i in range(len(source))]


def _crafted_tar(path, original):
  """One record per filter reason, each passing every other check, plus one kept."""
  meta = lambda url, sim=0.9: json.dumps({"url": url, "similarity": sim}).encode()
  wide = io.BytesIO()
  Image.new("RGB", (96, 16), (0, 90, 0)).save(wide, format="JPEG")
  cases = {  # key: (image, caption, meta)
      "dupimg": (original["image"], "the same picture again", meta("u://other")),
      "dupurl": (_jpeg(24, (0, 0, 200)), "another picture", meta(json.loads(
          original["meta"])["url"])),
      "tiny": (_jpeg(8, (9, 9, 9)), "a very small picture", meta("u://tiny")),
      "wide": (wide.getvalue(), "a wide picture", meta("u://wide")),
      "longcap": (_jpeg(24, (5, 50, 5)), " ".join(["word"] * 31), meta("u://long")),
      "lowsim": (_jpeg(24, (50, 5, 5)), "an unrelated caption", meta("u://low", 0.01)),
      "fine": (_jpeg(24, (70, 70, 7)), "a fine picture", meta("u://fine")),
  }
  with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
    for key, (image, caption, info) in cases.items():
      _add(tar, f"{key}.jpg", image)
      _add(tar, f"{key}.txt", caption.encode())
      _add(tar, f"{key}.json", info)
  return len(cases)


def _bad_obelics(path):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  image = _jpeg()
  rows = [{"texts": ["hello", None], "images": [None, image]},  # good
          {"texts": ["only text"], "images": [None]},
          {"texts": [None], "images": [image]},
          {"texts": ["x", None], "images": [None, b"broken"]},
          {"texts": ["x", "y"], "images": [image, None]},
          {"texts": ["x"], "images": [None, image]}]
  schema = pa.schema([("texts", pa.list_(pa.string())), ("images", pa.list_(pa.binary()))])
  pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


@pytest.fixture(scope="module")
def inputs(data_dir, tmp_path_factory):
  """{format: (glob, expected)}: the sample data plus dirty, filtered and duplicate records;
  `expected` are counts worked out from the fixtures, not from either executor."""
  root = tmp_path_factory.mktemp("beam_inputs")
  tars, wds = _wds(data_dir)
  low = {r["key"] for r in wds if json.loads(r["meta"])["similarity"] < SIMILARITY}
  out = {}

  pairs = root / "pairs"
  pairs.mkdir()
  shutil.copy(tars[0], pairs / "00000.tar")
  num_bad = _write_shard(str(pairs / "00001.tar"))
  crafted = _crafted_tar(str(pairs / "00002.tar"),
                         next(r for r in reversed(wds) if r["key"] not in low))
  out["img2dataset"] = (str(pairs / "*.tar"), {
      "in": len(wds) + 40 + num_bad + crafted, "bad": num_bad, "out": len(wds) - len(low) + 1,
      "removed": {"bad record": num_bad, "duplicate image": 1, "duplicate url": 1,
                  "image side below 16": 1, "side ratio above 3": 1,
                  "caption longer than 30 words": 1, "meta similarity missing": 40,
                  f"meta similarity below {SIMILARITY:g}": len(low) + 1}})

  tfrecords = root / "tfrecord"
  tfrecords.mkdir()
  synthetic_formats.write_img2dataset_tfrecord(str(tfrecords / "a.tfrecord"), wds)
  synthetic_formats.write_img2dataset_tfrecord(str(tfrecords / "b.tfrecord"), wds[:20])
  data = open(tfrecords / "b.tfrecord", "rb").read()
  open(tfrecords / "b.tfrecord", "wb").write(data[:len(data) - 300])  # 19 left + 1 bad
  dups = sum(r["key"] not in low for r in wds[:19])
  out["img2dataset-tfrecord"] = (str(tfrecords / "*.tfrecord"), {
      "in": len(wds) + 20, "bad": 1, "out": len(wds) - len(low),
      "removed": {"bad record": 1, "duplicate image": dups,
                  f"meta similarity below {SIMILARITY:g}": len(low) + 19 - dups}})

  text = root / "text"
  text.mkdir()
  lines = open(glob.glob(os.path.join(data_dir, "synthetic", "text", "validation",
                                      "*.jsonl"))[0]).read().splitlines()
  (text / "a.jsonl").write_text("\n".join(lines) + "\n")
  (text / "b.jsonl").write_text('{"text": "fine"}\n{"text": \n{"no_text": 1}\n{"text": 3}\n\n'
                                '{"text": "ok"}\n')
  out["text"] = (str(text / "*.jsonl"), {"in": len(lines) + 5, "bad": 3,
                                         "out": len(lines) + 2, "removed": {"bad record": 3}})

  mmc4 = root / "mmc4"
  mmc4.mkdir()
  synthetic_formats.write_mmc4(str(mmc4 / "a.jsonl"), 12)
  synthetic_formats.write_mmc4(str(mmc4 / "b.jsonl"), 12)  # the same documents again
  synthetic_formats.write_mmc4(str(mmc4 / "c.jsonl"), 6, seed=1, image_size=8)  # too small
  with open(mmc4 / "c.jsonl", "a") as f:
    f.write('{"text_list": ["a"], "image_info": []}\n{bad\n')
  usable = lambda path: sum(any(i["matched_sim"] >= 0.24 for i in json.loads(l)["image_info"])
                            for l in open(path) if l.startswith('{"url"'))
  good, small = usable(mmc4 / "a.jsonl"), usable(mmc4 / "c.jsonl")
  no_image = 2 * (12 - good) + (6 - small) + 1
  out["mmc4"] = (str(mmc4 / "*.jsonl"), {
      "in": 12 + 12 + 6 + 2, "bad": no_image + 1, "out": good,
      "removed": {"bad record": no_image + 1, "duplicate image": good,
                  "document: no image passes the filters": small}})

  obelics = root / "obelics"
  obelics.mkdir()
  synthetic_formats.write_obelics(str(obelics / "a.parquet"), 8)
  shutil.copy(obelics / "a.parquet", obelics / "b.parquet")
  _bad_obelics(str(obelics / "c.parquet"))
  out["obelics"] = (str(obelics / "*.parquet"), {
      "in": 8 + 8 + 6, "bad": 5, "out": 9,
      "removed": {"bad record": 5, "duplicate image": 8}})
  return out


def _check_filtered(records):
  """What every written record must satisfy, checked on the records themselves."""
  hashes, urls = set(), set()
  for record in records:
    images = [record["image"]] if record["kind"] == "pairs" else [
        i for i in record.get("images", ()) if i is not None]
    for image in images:
      w, h = Image.open(io.BytesIO(image)).size
      assert min(w, h) >= 16 and max(w, h) <= 3 * min(w, h)
    if record["kind"] == "pairs":
      assert 1 <= len(record["text"].split()) <= 30
      assert json.loads(record["meta"])["similarity"] >= SIMILARITY - 1e-6
    if images:
      digest = hashlib.sha256(b"".join(hashlib.sha256(i).digest() for i in images)).hexdigest()
      assert digest not in hashes
      hashes.add(digest)
    url = json.loads(record.get("meta") or "{}").get("url")
    if url:
      assert url not in urls
      urls.add(url)


def _histograms(records):
  sides, words = collections.Counter(), collections.Counter()
  for record in records:
    images = [record["image"]] if record["kind"] == "pairs" else [
        i for i in record.get("images", ()) if i is not None]
    for image in images:
      sides[str(2 ** int(math.log2(min(Image.open(io.BytesIO(image)).size))))] += 1
    texts = [record["text"]] if "text" in record else [t for t in record["texts"] if t]
    words[str(2 ** int(math.log2(sum(len(t.split()) for t in texts))))] += 1
  return dict(sides), dict(words)


@pytest.mark.parametrize("fmt", FORMATS)
def test_beam_matches_local_ingest(inputs, tmp_path, fmt):
  pattern, expected = inputs[fmt]
  local = ingest.run(fmt, pattern, str(tmp_path / "local"), **OPTIONS)
  beam = ingest.run(fmt, pattern, str(tmp_path / "beam"), runner="beam",
                    beam_options=_direct(2, "multi_threading"), **OPTIONS)
  got = _records(tmp_path / "beam")
  assert got == _records(tmp_path / "local")  # same good records, same order
  _same_output(tmp_path / "local", tmp_path / "beam")  # same bytes in the same shards
  assert beam["runner"] == "beam" and local["runner"] == "local"
  assert beam["records"] == local["records"] == len(got) == expected["out"]
  assert beam["shards"] == math.ceil(len(got) / 16)
  _check_filtered(got)

  stats = ingest_local.read_statistics(tmp_path / "beam")
  assert stats["records_in"] == expected["in"]
  assert stats["records_out"] == expected["out"]
  assert stats["removed"] == {k: v for k, v in expected["removed"].items() if v}
  assert sum(stats["bad_records"].values()) == expected["bad"] == sum(beam["skipped"].values())
  sides, words = _histograms(got)
  assert stats["image_side_histogram"] == sides
  assert stats["caption_words_histogram"] == words


def test_same_shards_whatever_the_workers_and_experts(inputs, tmp_path, data_config):
  pattern, _ = inputs["img2dataset"]
  ingest.run("img2dataset", pattern, str(tmp_path / "local"), **OPTIONS)
  ingest.run("img2dataset", pattern, str(tmp_path / "procs2"), runner="beam",
             beam_options=_direct(2, "multi_processing"), **OPTIONS)
  cli.main(["ingest", "--format", "img2dataset", "--input", pattern, "--output",
            str(tmp_path / "threads3"), "--shard-size", "16", "--max-bad-fraction", "0.9",
            "--max-pixels", "1000000",
            "--min-image-side", "16", "--max-side-ratio", "3", "--min-caption-words", "1",
            "--max-caption-words", "30", "--min-meta", f"similarity={SIMILARITY}",
            "--dedup", "image,url", "--runner", "beam",
            "--beam_option", "direct_num_workers=3",
            "--beam_option", "direct_running_mode=multi_threading"])
  _same_output(tmp_path / "procs2", tmp_path / "threads3")
  _same_output(tmp_path / "local", tmp_path / "procs2")

  # Prismer's edge expert over the prepared shards: Beam and local write the same bytes, the
  # labels are experts.edge_expert's of each image, stored as Prismer's processor reads them.
  def run_experts(output, *runner):
    cli.main(["experts", "--input", str(tmp_path / "procs2"), "--output", str(output),
              "--experts", "edge", "--shard-size", "16", *runner])
  run_experts(tmp_path / "labelled", "--runner", "beam", "--beam_option", "direct_num_workers=3",
          "--beam_option", "direct_running_mode=multi_threading")
  run_experts(tmp_path / "labelled_local")
  _same_output(tmp_path / "labelled", tmp_path / "labelled_local")
  labelled, plain = _records(tmp_path / "labelled"), _records(tmp_path / "procs2")
  assert len(labelled) == len(plain)
  for record, original in zip(labelled, plain):
    labels = experts_lib.decode_labels(record.pop("experts"), record.pop("images"))
    image = np.asarray(Image.open(io.BytesIO(original["image"])).convert("RGB"))
    assert list(labels) == ["edge"]
    np.testing.assert_array_equal(labels["edge"], experts_lib.edge_expert(image))
    assert record == original
  # A plain labeller spec works through the same command.
  cli.main(["experts", "--input", str(tmp_path / "procs2"), "--output",
            str(tmp_path / "mean"), "--experts", "mean_colour=1"])
  record = _records(tmp_path / "mean")[0]
  assert record["labels"]["mean_colour"] == [np.round(np.asarray(Image.open(io.BytesIO(
      plain[0]["image"])).convert("RGB"), np.float64).mean(axis=(0, 1)), 1).tolist()]

  # Training reads the Beam output as it reads the local ingest's (a task by its path).
  data_config.mixture = str(tmp_path / "procs2")
  (spec, rate), = catalog.resolve(data_config.mixture).tasks
  assert (spec.name, spec.kind, rate) == (str(tmp_path / "procs2"), "pairs", 1.0)
  batch = next(pipeline.make_train_iterator(data_config, "simvlm", global_batch_size=4, seed=0,
                                            process_index=0, process_count=1))
  assert batch["images"].shape == (4, 1, 32, 32, 3) and batch["image_mask"].all()


def test_labeller_drops_records_after_dedup_the_same_way(inputs, tmp_path):
  """Precomputed depth for every other kept record: the others are bad records, dropped
  after dedup and before the records are numbered, identically by both executors."""
  pattern, expected = inputs["img2dataset"]
  local = ingest.run("img2dataset", pattern, str(tmp_path / "plain"), **OPTIONS)
  keys = [r["key"] for r in _records(tmp_path / "plain")]
  labels = tmp_path / "labels" / "depth"
  labels.mkdir(parents=True)
  for i, key in enumerate(keys[::2]):
    Image.fromarray(np.full((8, 8), i, np.uint8)).save(labels / f"{key}.png")
  spec = f"experts=depth;labels={tmp_path / 'labels'}"
  ingest.run("img2dataset", pattern, str(tmp_path / "local"), experts=spec, **OPTIONS)
  beam = ingest.run("img2dataset", pattern, str(tmp_path / "beam"), experts=spec,
                    runner="beam", beam_options=_direct(2, "multi_threading"), **OPTIONS)
  _same_output(tmp_path / "local", tmp_path / "beam")
  got = _records(tmp_path / "beam")
  assert [r["key"] for r in got] == keys[::2] and beam["records"] == len(keys[::2])
  assert beam["skipped"]["missing precomputed label"] == len(keys[1::2])
  assert local["records"] == expected["out"] == len(keys)
  for i, record in enumerate(got):
    depth = experts_lib.decode_labels(record["experts"], record["images"])["depth"]
    assert depth.shape == Image.open(io.BytesIO(record["image"])).size[::-1]
    assert (depth == i).all()


def test_bad_options_name_the_flag(inputs, tmp_path):
  with pytest.raises(ValueError, match="--beam_option"):
    ingest.run("text", inputs["text"][0], str(tmp_path / "o"), runner="beam",
               beam_options=["direct_num_workers"])
  with pytest.raises(ValueError, match="--min-meta"):
    filters.Filters.from_strings(min_meta=["similarity"])
  with pytest.raises(ValueError, match="--dedup"):
    filters.Filters.from_strings(dedup="pixels")
  with pytest.raises(ValueError, match="--experts"):
    ingest.run("text", inputs["text"][0], str(tmp_path / "o"), experts="nonsense")
