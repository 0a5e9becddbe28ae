"""The example configs (configs/examples/) read the sources they name: Flamingo's blend of
ingested pairs, interleaved documents and text, and MiniGPT-v2 stage 2 on RefCOCO through a
seqio tasks module (a TFDS dataset with ref_coco's layout, built in tests/user_data.py)."""
import os

import numpy as np

from vlm_jax import config as config_lib
from vlm_jax.data import mixture
from vlm_jax.data.vocab import Vocab
from vlm_jax.inspection import data as data_insp

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "configs", "examples")


def _rates_hold(config, records=400):
  for task, rate, share in data_insp.realised_proportions(config, records):
    assert abs(share - rate) < 0.02, (task, rate, share)


def test_flamingo_blend_reads_pairs_documents_and_text(user_data, tmp_path):
  root = tmp_path / "vlm"
  root.mkdir()
  for name, target in {"laion": user_data.laion, "coyo": user_data.laion,
                       "mmc4": user_data.mmc4, "obelics": user_data.mmc4,
                       "c4": user_data.c4}.items():
    (root / name).symlink_to(target)
  config = config_lib.load_config(os.path.join(EXAMPLES, "flamingo_blend.py") +
                                  f":tiny,root={root}")
  specs = {spec.name: (spec.kind, spec.template, spec.loss_weight, round(rate, 3))
           for spec, rate in mixture.check(config.data, "flamingo").tasks}
  assert specs == {"laion": ("pairs", "document", 0.2, 0.5),
                   "coyo": ("pairs", "document", 0.2, 0.5),
                   "mmc4": ("interleaved", "document", 1.0, 0.5),
                   "obelics": ("interleaved", "document", 1.0, 0.5),
                   "c4": ("text", "text", 1.0, 0.2)}
  _rates_hold(config)
  (batch,), _ = data_insp.read_batches(config, 16)
  text_only = batch["image_mask"].sum(axis=1) == 0
  assert text_only.any() and (batch["loss_weight"][text_only] == 1.0).all()
  # A text document is trained on every token (no media to wait for).
  np.testing.assert_array_equal(batch["loss_mask"][text_only], batch["token_mask"][text_only])


def test_minigpt_v2_stage_on_a_seqio_refcoco_task(user_data, monkeypatch):
  monkeypatch.setenv("VLM_REFCOCO_TFDS", "vlm_test_ref_coco:1.0.0")
  monkeypatch.setenv("VLM_REFCOCO_TFDS_DIR", user_data.tfds_tfrecord)
  config = config_lib.load_config(os.path.join(EXAMPLES, "minigpt_v2_refcoco.py") + ":tiny")
  specs = {spec.name: (spec.format, spec.kind, spec.template)
           for spec, _ in mixture.check(config.data, "minigpt_v2").tasks}
  assert specs == {"refer": ("seqio", "grounding", "refer"),
                   "identify": ("seqio", "grounding", "identify"),
                   "grounded": ("seqio", "grounding", "grounding"),
                   "detection": ("seqio", "grounding", "detection")}
  _rates_hold(config)
  (batch,), counts = data_insp.read_batches(config, 8)
  assert counts["skipped_records"] == 0
  vocab = Vocab(config.data.vocab_path)
  answers = [vocab.decode(t[m > 0]) for t, m in zip(batch["targets"], batch["loss_mask"])]
  assert sum("{<" in a for a in answers) >= 4, answers  # boxes in refer/grounded/detection
