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

from gcs_server import gcs, gcs_dir  # noqa: E402,F401  (fixtures: a local GCS server)
