"""vlm_jax: pretraining vision-language models in JAX/Flax at TPU-pod scale."""
# Before orbax or JAX's compilation cache resolve their first gs:// path: epath on gcsfs, no
# stale GCS listings (storage.py's docstring says why).
from vlm_jax import storage as _storage  # noqa: F401
from vlm_jax import libtpu_env

libtpu_env.quiet_libtpu_without_tpus()
