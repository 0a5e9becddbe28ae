"""The seqio view of the catalog (imports TensorFlow)."""
import seqio
import pytest

from vlm_jax.data.families import simvlm


@pytest.fixture(scope="module")
def registered(data_dir):
  import os  # pylint: disable=g-import-not-at-top
  os.environ["VLM_JAX_DATA_DIR"] = data_dir
  from vlm_jax.data import seqio_tasks  # pylint: disable=g-import-not-at-top,unused-import
  yield
  del os.environ["VLM_JAX_DATA_DIR"]


def test_mixture_rates_match_catalog(registered):
  mixture = seqio.get_mixture_or_task("pretrain_simvlm")
  assert {t.name: mixture.get_rate(t) for t in mixture.tasks} == dict(
      simvlm.MIXTURES["pretrain_simvlm"])


def test_every_family_mixture_is_registered(registered):
  for name in ("pretrain_flamingo", "minigpt_v2_stage3", "cogagent_pretrain"):
    assert seqio.get_mixture_or_task(name).tasks


def test_task_examples_the_seqio_way(registered):
  pairs = seqio.get_mixture_or_task("synthetic_pairs").get_dataset(
      sequence_length={"text": 32}, split="validation", shuffle=False)
  example = next(pairs.as_numpy_iterator())
  assert example["image"].shape == (32, 32, 3) and example["text"][-1] == 1  # EOS
  text = seqio.get_mixture_or_task("synthetic_text").get_dataset(
      sequence_length={"text": 32}, split="validation", shuffle=False)
  assert next(text.as_numpy_iterator())["text_pretokenized"]
