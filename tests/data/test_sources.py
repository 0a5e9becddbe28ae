import glob
import json
import os
import pickle
import tarfile

from vlm_jax.data.sources import jsonl, webdataset


def _tars(data_dir, split="train"):
  return sorted(glob.glob(os.path.join(data_dir, "synthetic", "pairs", split, "*.tar")))


def test_tar_index_matches_tarfile(data_dir):
  path = _tars(data_dir)[0]
  assert list(webdataset._scan_ustar(path)) == list(webdataset._scan_tarfile(path))


def test_webdataset_reads_every_member(data_dir):
  source = webdataset.WebDatasetSource(_tars(data_dir))
  expected = {}
  for path in _tars(data_dir):
    with tarfile.open(path) as tar:
      for member in tar:
        key, ext = webdataset.split_key(member.name)
        expected.setdefault(key, {})[ext] = tar.extractfile(member).read()
  assert len(source) == len(expected)
  for index in (0, 7, len(source) - 1):
    record = source[index]
    want = expected[record["key"]]
    assert record["image"] == want["jpg"]
    assert record["text"] == want["txt"].decode()
    assert json.loads(record["meta"])["caption"] == record["text"]


def test_source_pickles_without_open_files(data_dir):
  source = webdataset.WebDatasetSource(_tars(data_dir))
  source[0]
  clone = pickle.loads(pickle.dumps(source))
  assert clone[3] == source[3]


def test_jsonl_text_source(data_dir):
  paths = glob.glob(os.path.join(data_dir, "synthetic", "text", "train", "*.jsonl"))
  source = jsonl.JsonlTextSource(paths)
  lines = [l for p in paths for l in open(p, encoding="utf-8")]
  assert len(source) == len(lines)
  assert source[5]["text"] == lines[5]
