"""Eight simulated CPU devices for every test; must run before jax is imported."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# Tests compile the same tiny programs many times (and in subprocesses): share the cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/vlm_jax_test_jax_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402  (after the environment above)

from gcs_server import gcs, gcs_dir  # noqa: E402,F401  (fixtures: a local GCS server)


@pytest.fixture(scope="session")
def user_data(tmp_path_factory):
  """A pretraining user's own data (tests/user_data.py): TFDS datasets, a seqio tasks
  module outside the package, ingested img2dataset and MMC4 directories."""
  import user_data as user_data_lib  # pylint: disable=g-import-not-at-top  (TensorFlow)
  return user_data_lib.make(str(tmp_path_factory.mktemp("user_data")))
