"""Keeps libtpu quiet on machines without TPUs.

With the `[tpu]` extra installed, jax tries the TPU backend at start-up on every machine.
Without TPU chips, jax tells libtpu to skip the GCE metadata query (TPU_SKIP_MDS_QUERY=1), so
libtpu cannot learn the worker hostnames and host bounds; it fills them with warning text and
then prints `could not determine TPU worker hostnames` and `Failed to find host bounds`
errors before giving up on the TPU backend (quietly, as jax intends) and using the CPU.
Describing a topology for ahead-of-time compilation (vlm-compile) goes through the same
initialisation. Telling libtpu the single-host answer it would fall back to anyway
(this host, one host) removes the messages and changes nothing else: the topologies
vlm-compile describes are the same with and without it. Nothing is set when this machine
has TPU chips (as jax counts them) or when the variables are already set.
"""
import os

QUIET_WITHOUT_TPUS = {"TPU_WORKER_HOSTNAMES": "localhost", "TPU_HOST_BOUNDS": "1,1,1"}


def _tpu_chips() -> int:
  try:  # jax's own count, the one that decides whether it skips the metadata query
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    return hardware_utils.num_available_tpu_chips_and_device_id()[0]
  except Exception:  # pylint: disable=broad-except
    return -1  # unknown: leave libtpu alone


def quiet_libtpu_without_tpus() -> None:
  """Sets QUIET_WITHOUT_TPUS (where unset) on a machine without TPU chips; call before the
  first use of a jax backend (importing vlm_jax does)."""
  if "JAX_FORCE_TPU_INIT" in os.environ or _tpu_chips() != 0:
    return
  for name, value in QUIET_WITHOUT_TPUS.items():
    os.environ.setdefault(name, value)
