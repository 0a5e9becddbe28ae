"""On a machine without TPUs, the `[tpu]` extra's libtpu prints worker-hostname errors when
jax starts (or describes a topology); importing vlm_jax first leaves nothing to see."""
import os
import subprocess
import sys

import pytest
from jax._src import hardware_utils

from vlm_jax import libtpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESSAGES = ("could not determine TPU worker hostnames", "Failed to find host bounds")
START_JAX = "import jax; jax.devices(); "
DESCRIBE_TOPOLOGY = ("from jax.experimental import topologies; print(len(topologies."
                     "get_topology_desc(platform='tpu', topology_name='v5p:2x2x2').devices))")

pytestmark = pytest.mark.skipif(hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0,
                                reason="this machine has TPUs: libtpu has its real settings")


def run(code: str) -> str:
  # Without the variables this test process got from importing vlm_jax; past the machine-wide
  # libtpu lock that another process (a parallel test) may hold.
  env = {k: v for k, v in os.environ.items() if k not in libtpu_env.QUIET_WITHOUT_TPUS}
  env.update(ALLOW_MULTIPLE_LIBTPU_LOAD="1", PYTHONPATH=REPO)
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout + result.stderr


def test_jax_alone_prints_libtpus_errors():  # what users saw; proves the check below can fail
  out = run(START_JAX + DESCRIBE_TOPOLOGY)
  assert all(message in out for message in MESSAGES), out


def test_importing_vlm_jax_first_silences_them_and_the_topology_is_the_same():
  out = run("import vlm_jax; " + START_JAX + DESCRIBE_TOPOLOGY)
  assert not any(message in out for message in MESSAGES), out
  assert out.splitlines()[-1] == "8"
