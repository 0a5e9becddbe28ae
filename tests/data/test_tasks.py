"""The seqio view of the catalog (imports TensorFlow)."""
import pytest

seqio = pytest.importorskip("seqio")


@pytest.fixture(scope="module")
def registered(data_dir):
  import os  # pylint: disable=g-import-not-at-top
  os.environ["VLM_JAX_DATA_DIR"] = data_dir
  from vlm_jax.data import tasks  # pylint: disable=g-import-not-at-top,unused-import
  yield
  del os.environ["VLM_JAX_DATA_DIR"]


def test_mixture_rates_match_catalog(registered):
  from vlm_jax.data import catalog  # pylint: disable=g-import-not-at-top
  mixture = seqio.get_mixture_or_task("pretrain_simvlm")
  assert {t.name: mixture.get_rate(t) for t in mixture.tasks} == dict(
      catalog.MIXTURES["pretrain_simvlm"].rates)


def test_task_examples_the_seqio_way(registered):
  pairs = seqio.get_mixture_or_task("synthetic_pairs").get_dataset(
      sequence_length={"text": 32}, split="validation", shuffle=False)
  example = next(pairs.as_numpy_iterator())
  assert example["image"].shape == (32, 32, 3) and example["text"][-1] == 1  # EOS
  text = seqio.get_mixture_or_task("synthetic_text").get_dataset(
      sequence_length={"text": 32}, split="validation", shuffle=False)
  assert next(text.as_numpy_iterator())["text_pretokenized"]
