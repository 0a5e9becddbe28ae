import glob
import json
import os
import tarfile

import pyarrow.parquet as pq

from vlm_jax.data.synthetic import sample_data, scenes


def test_img2dataset_layout(data_dir, sizes):
  pairs = os.path.join(data_dir, "synthetic", "pairs", "train")
  tars = sorted(glob.glob(os.path.join(pairs, "*.tar")))
  assert [os.path.basename(t) for t in tars] == ["00000.tar", "00001.tar", "00002.tar"]
  for tar_path in tars:
    stem = tar_path[:-4]
    rows = pq.read_table(stem + ".parquet").to_pylist()
    assert len(rows) == sizes.shard_size  # all rows, failures included
    stats = json.load(open(stem + "_stats.json"))
    assert stats["count"] == len(rows)
    ok = [r for r in rows if r["status"] == "success"]
    assert stats["successes"] == len(ok)
    with tarfile.open(tar_path) as tar:
      names = tar.getnames()
      assert len(names) == 3 * len(ok)
      shard = os.path.basename(stem)
      for row in ok:
        key = row["key"]
        assert len(key) == 9 and key.startswith(shard)
        assert {f"{key}.jpg", f"{key}.txt", f"{key}.json"} <= set(names)
      meta = json.load(tar.extractfile(f"{ok[0]['key']}.json"))
      for field in ("url", "caption", "key", "status", "error_message", "width", "height",
                    "original_width", "original_height", "exif", "similarity"):
        assert field in meta
      assert tar.extractfile(f"{ok[0]['key']}.txt").read().decode() == meta["caption"]
      assert meta["width"] == sizes.image_size


def test_text_documents(data_dir, sizes):
  lines = open(os.path.join(data_dir, "synthetic", "text", "validation", "00000.jsonl")).readlines()
  assert len(lines) == sizes.validation_docs
  assert all(json.loads(line)["text"] for line in lines)


def test_deterministic_and_splits_differ(tmp_path):
  sizes = sample_data.SyntheticSizes(train_pairs=20, validation_pairs=20, train_docs=5,
                                   validation_docs=5, train_interleaved=2,
                                   validation_interleaved=2, shard_size=20, image_size=32)
  sample_data.generate(str(tmp_path / "a"), sizes)
  sample_data.generate(str(tmp_path / "b"), sizes)
  read = lambda root, split: open(tmp_path / root / "pairs" / split / "00000.tar", "rb").read()
  assert read("a", "train") == read("b", "train")
  assert read("a", "train") != read("a", "validation")


def test_ensure_is_idempotent(data_dir, sizes):
  before = os.path.getmtime(os.path.join(data_dir, "synthetic", "manifest.json"))
  target = sample_data.ensure_sample_data(data_dir, sizes)
  assert target == os.path.join(data_dir, "synthetic")
  assert os.path.getmtime(os.path.join(data_dir, "synthetic", "manifest.json")) == before
  assert not [p for p in os.listdir(data_dir) if p.startswith(".synthetic-tmp")]


def test_captions_follow_grammar():
  import numpy as np  # pylint: disable=g-import-not-at-top
  groups = [(2, "red", "circle", "left"), (1, "blue", "square", "right")]
  assert scenes.describe(groups) == "two red circles on the left and a blue square on the right"
  image = scenes.render_scene(groups, 64, np.random.default_rng(0))
  pixels = np.asarray(image)
  red = (pixels[..., 0] > 180) & (pixels[..., 1] < 90)
  assert red[:, :26].sum() > 20 and red[:, 38:].sum() == 0  # the red circles are on the left
