import json
import multiprocessing
import os

from vlm_jax.cli import data as cli
from vlm_jax.data.synthetic import sample_data

TINY = dict(train_pairs=30, validation_pairs=10, train_docs=10, validation_docs=5,
            train_interleaved=2, validation_interleaved=2, shard_size=15, image_size=16)


def _generate(root):
  sample_data.ensure_sample_data(root, sample_data.SyntheticSizes(**TINY))


def test_concurrent_first_use_is_safe(tmp_path):
  ctx = multiprocessing.get_context("spawn")
  procs = [ctx.Process(target=_generate, args=(str(tmp_path),)) for _ in range(3)]
  for p in procs:
    p.start()
  for p in procs:
    p.join(120)
  assert [p.exitcode for p in procs] == [0, 0, 0]
  assert sample_data.is_complete(str(tmp_path / "synthetic"))
  assert os.listdir(tmp_path) == ["synthetic"]  # no staging dirs left behind


def test_generate_ingest_inspect(tmp_path, capsys):
  cli.main(["generate", "--output", str(tmp_path), "--train-pairs", "30",
            "--validation-pairs", "10", "--train-docs", "10", "--validation-docs", "5",
            "--shard-size", "15", "--image-size", "16"])
  assert sample_data.is_complete(str(tmp_path / "synthetic"))
  cli.main(["ingest", "--format", "img2dataset", "--input",
            str(tmp_path / "synthetic" / "pairs" / "train" / "*.tar"),
            "--output", str(tmp_path / "out")])
  out = capsys.readouterr().out
  assert json.loads(out[out.index("{"):])["records"] > 25
  cli.main(["inspect", str(tmp_path / "out"), "--num", "2"])
  out = capsys.readouterr().out
  assert "ArrayRecordSource" in out and "text: 'a " in out and "[0] <image" not in out
  cli.main(["inspect", str(tmp_path / "out"), "--num", "2", "--config",
            "configs/simvlm.py:tiny"])  # also as SimVLM's training examples
  assert "[0] <image 64x64" in capsys.readouterr().out
