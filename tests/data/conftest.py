"""Small sample data in the real formats, generated once per test session."""
import pytest

from vlm_jax import config as config_lib
from vlm_jax.data.synthetic import sample_data

SMALL = sample_data.SyntheticSizes(train_pairs=600, validation_pairs=64, train_docs=300,
                                 validation_docs=40, train_interleaved=20,
                                 validation_interleaved=10, shard_size=200, image_size=32)


@pytest.fixture(scope="session")
def sizes():
  return SMALL


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("vlm_data"))
  sample_data.ensure_sample_data(root, SMALL)
  return root


@pytest.fixture
def data_config(data_dir):
  """SimVLM's data fields (configs/simvlm.py) at the small sizes."""
  cfg = config_lib.default_data_config()
  cfg.data_dir = data_dir
  cfg.mixture = "pretrain_simvlm"
  cfg.image_size = 32
  cfg.prefix_length = 8
  cfg.suffix_length = 24
  cfg.pair_zero_prefix_prob = 0.5
  return cfg
