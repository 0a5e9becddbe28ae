"""A real GCS API on localhost for the test session (fake-gcs-server; vlm_jax.gcs_emulator).

`gcs` starts it once, creates the buckets and points every storage library at it, in this
process and in every subprocess a test starts (they inherit os.environ); `gcs_dir` is a fresh
gs:// directory per test.
"""
import os
import uuid

import pytest

from vlm_jax.gcs_emulator import LocalGCS

BUCKET = "vlm-test"


@pytest.fixture(scope="session")
def gcs():
  server = LocalGCS(buckets=[BUCKET]).start()
  saved = {name: os.environ.get(name) for name in server.env}
  os.environ.update(server.env)
  import gcsfs  # pylint: disable=g-import-not-at-top
  if gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem:
    server.stop()
    raise RuntimeError("gcsfs was imported before the GCS test server set "
                       "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false; its zonal-bucket probe would "
                       "stall every call against the emulator")
  yield server
  for name, value in saved.items():
    if value is None:
      os.environ.pop(name, None)
    else:
      os.environ[name] = value
  server.stop()


@pytest.fixture
def gcs_dir(gcs):
  return f"gs://{BUCKET}/{uuid.uuid4().hex[:12]}"
