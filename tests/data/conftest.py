"""Small sample data in the real formats, generated once per test session."""
import pytest

from vlm_jax.data import defaults, synthetic

SMALL = synthetic.SyntheticSizes(train_pairs=600, validation_pairs=64, train_docs=300,
                                 validation_docs=40, train_interleaved=20,
                                 validation_interleaved=10, shard_size=200, image_size=32)


@pytest.fixture(scope="session")
def sizes():
  return SMALL


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("vlm_data"))
  synthetic.ensure_sample_data(root, SMALL)
  return root


@pytest.fixture
def data_config(data_dir):
  cfg = defaults.default_data_config()
  cfg.data_dir = data_dir
  cfg.image_size = 32
  cfg.prefix_length = 8
  cfg.suffix_length = 24
  return cfg
