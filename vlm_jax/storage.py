"""Every path the project reads or writes: a local path or `gs://bucket/...`, one API.

Built on etils.epath, which orbax and JAX's compilation cache already use, so checkpoints,
the compilation cache and our own files all go through the same GCS client:

- epath runs on fsspec/gcsfs here, not tf.io.gfile: gfile's GCS endpoints are compiled in, so
  it cannot be pointed at a local GCS server and the tests could not exercise the code a pod
  job runs. `EPATH_USE_TF=false` is set (unless the user set it) when vlm_jax is imported,
  before any library resolves a gs:// path.
- gcsfs's directory-listing cache is off: a listing cached in one process never sees the
  objects another process (another host of the pod) wrote since, e.g. a new checkpoint step.
- GCS has no append and no rename. gcsfs's mode "a" silently overwrites, so `open` refuses it
  and `append` uploads the new bytes beside the object and composes the two; `move` copies
  then deletes each object (not atomic); an object appears whole when its upload completes,
  which is the atomic write GCS offers (`write_atomic`).
- Libraries that need a real local file (ArrayRecordWriter, sentencepiece, torch.load) get
  one from `local_copy` (download) or `staged_write` (upload on success).
"""
import builtins
import contextlib
import glob as glob_lib
import os
import shutil
import tempfile
import uuid

import fsspec
from etils import epath

os.environ.setdefault("EPATH_USE_TF", "false")
fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)

GCS = "gs://"


class StorageError(OSError):
  """A path that cannot be used; the one-line message names the path and the fix."""


# ----------------------------------------------------------------------------------------------
# Paths.
# ----------------------------------------------------------------------------------------------
def is_gcs(path) -> bool:
  return os.fspath(path).startswith(GCS)


def validate(path) -> str:
  """`path` as a string if it is local or gs://bucket/...; else a StorageError."""
  path = os.fspath(path)
  scheme, sep, rest = path.partition("://")
  if sep and scheme != "gs":
    raise StorageError(f"{path}: unsupported path scheme '{scheme}://'; use a local path or "
                       "gs://bucket/...")
  if sep and not rest.split("/", 1)[0]:
    raise StorageError(f"{path}: no bucket name; use gs://bucket/...")
  return path


def as_path(path) -> epath.Path:
  return epath.Path(validate(path))


def abspath(path) -> str:
  """Local paths made absolute; gs:// paths are absolute already."""
  path = validate(path)
  return path if is_gcs(path) else os.path.abspath(path)


def join(path, *parts) -> str:
  """os.path.join for local and gs:// paths: a part that is absolute (/..., gs://...) starts
  the path over, as os.path.join does for /... (it would append gs://... as a name)."""
  path = os.fspath(path)
  for part in map(os.fspath, parts):
    path = part if is_gcs(part) else os.path.join(path, part)
  return path


def bucket(path) -> str:
  return validate(path)[len(GCS):].split("/", 1)[0]


def _gcs():
  return fsspec.filesystem("gs")


# ----------------------------------------------------------------------------------------------
# Files and directories.
# ----------------------------------------------------------------------------------------------
def open(path, mode: str = "r"):  # pylint: disable=redefined-builtin
  """A file object. Writing creates missing local parent directories, as on GCS (which has
  none). "a" modes are refused for gs:// (use `append`)."""
  path = validate(path)
  if is_gcs(path) and "a" in mode:
    raise StorageError(f"{path}: GCS objects cannot be opened for append; use "
                       "vlm_jax.storage.append")
  if not is_gcs(path) and any(m in mode for m in "wax"):
    makedirs(os.path.dirname(os.path.abspath(path)))
  return epath.Path(path).open(mode)


def exists(path) -> bool:
  return as_path(path).exists()


def isdir(path) -> bool:
  return as_path(path).is_dir()


def size(path) -> int:
  path = validate(path)
  return _gcs().size(path) if is_gcs(path) else os.path.getsize(path)


def makedirs(path) -> None:
  """Local: os.makedirs(exist_ok=True). GCS has no directories: nothing to do."""
  if not is_gcs(validate(path)):
    os.makedirs(path, exist_ok=True)


def listdir(path) -> list[str]:
  """Sorted names directly under `path`."""
  return sorted(p.name for p in as_path(path).iterdir())


def glob(pattern) -> list[str]:
  """Sorted paths matching `pattern` (*, ?, [..]; ** across directories), with their scheme."""
  pattern = validate(pattern)
  if is_gcs(pattern):
    return sorted(GCS + p for p in _gcs().glob(pattern))
  return sorted(glob_lib.glob(pattern, recursive=True))


def remove(path) -> None:
  as_path(path).unlink()


def rmtree(path, missing_ok: bool = True) -> None:
  if missing_ok and not exists(path):
    return
  if is_gcs(path):
    _gcs().rm(path, recursive=True)
  else:
    shutil.rmtree(path)


def read_range(path, offset: int, length: int) -> bytes:
  """`length` bytes from `offset` (one ranged GET on GCS); fewer only at the end of the file."""
  path = validate(path)
  if is_gcs(path):
    return _gcs().cat_file(path, start=offset, end=offset + length)
  with builtins.open(path, "rb") as f:
    return os.pread(f.fileno(), length, offset)


def tree_size(path) -> int:
  """Bytes of every file under directory `path`."""
  path = validate(path)
  if is_gcs(path):
    return _gcs().du(path, total=True)
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(path) for name in names)


def read_bytes(path) -> bytes:
  return as_path(path).read_bytes()


def read_text(path) -> str:
  return as_path(path).read_text()


def write_atomic(path, data) -> None:
  """Readers see the old content or the new, never a part (bytes or str)."""
  path = validate(path)
  mode = "wb" if isinstance(data, bytes) else "w"
  if is_gcs(path):
    with open(path, mode) as f:  # the object is created when the upload completes
      f.write(data)
    return
  makedirs(os.path.dirname(os.path.abspath(path)))
  tmp = f"{path}.tmp-{uuid.uuid4().hex}"
  with builtins.open(tmp, mode) as f:
    f.write(data)
  os.replace(tmp, path)


def append(path, data) -> None:
  """Appends bytes or str. On GCS: uploads `data` beside the object, then composes both."""
  path = validate(path)
  data = data.encode() if isinstance(data, str) else data
  if not is_gcs(path):
    with builtins.open(path, "ab") as f:
      f.write(data)
    return
  fs = _gcs()
  if not fs.exists(path):
    fs.pipe_file(path, data)
    return
  part = f"{path}.append-{uuid.uuid4().hex}"
  fs.pipe_file(part, data)
  try:
    fs.merge(path, [path, part])
  finally:
    fs.rm_file(part)


class AppendFile:
  """A text file that only grows (metrics.jsonl): each `write` reaches storage at once."""

  def __init__(self, path):
    self.path = validate(path)
    self._local = None if is_gcs(self.path) else builtins.open(self.path, "a", buffering=1)

  def write(self, text: str) -> None:
    if self._local is not None:
      self._local.write(text)
    else:
      append(self.path, text)

  def flush(self) -> None:
    if self._local is not None:
      self._local.flush()

  def close(self) -> None:
    if self._local is not None:
      self._local.close()


def move(src, dst) -> None:
  """Moves a file or directory tree; `dst` must not exist. Not atomic on GCS."""
  src, dst = validate(src), validate(dst)
  if is_gcs(src) != is_gcs(dst):
    raise StorageError(f"{src} -> {dst}: move stays within one storage; copy instead")
  if exists(dst):
    raise StorageError(f"{dst} already exists; cannot move {src} there")
  if is_gcs(src):
    _gcs().mv(src, dst, recursive=True)
  else:
    makedirs(os.path.dirname(os.path.abspath(dst)))
    os.rename(src, dst)


def copy(src, dst) -> None:
  """Copies one file between any two paths (local or gs://)."""
  with open(src, "rb") as fin, open(dst, "wb") as fout:
    shutil.copyfileobj(fin, fout, 1 << 22)


def put_tree(local_dir, dst, last=()) -> None:
  """Copies every file under the local directory `local_dir` to the same place under `dst`;
  the files named in `last` (commit markers: a manifest) after all the others."""
  names = sorted(os.path.relpath(os.path.join(root, name), local_dir)
                 for root, _, files in os.walk(local_dir) for name in files)
  for name in sorted(names, key=lambda n: os.path.basename(n) in last):
    copy(os.path.join(local_dir, name), join(dst, name))


@contextlib.contextmanager
def local_copy(path):
  """Yields a local path holding `path`'s content (the path itself when it is local)."""
  path = validate(path)
  if not is_gcs(path):
    yield path
    return
  with tempfile.TemporaryDirectory(prefix="vlm_jax_download_") as tmp:
    local = os.path.join(tmp, os.path.basename(path.rstrip("/")))
    _gcs().get(path, local, recursive=True)
    yield local


@contextlib.contextmanager
def staged_write(path):
  """Yields a local path to write; on success it becomes `path` (uploaded, or renamed into
  place); on an exception nothing appears at `path`."""
  path = validate(path)
  directory = None if is_gcs(path) else os.path.dirname(os.path.abspath(path))
  if directory:
    makedirs(directory)
  with tempfile.TemporaryDirectory(prefix="vlm_jax_upload_", dir=directory) as tmp:
    local = os.path.join(tmp, os.path.basename(path))
    yield local
    if is_gcs(path):
      _gcs().put_file(local, path)
    else:
      os.replace(local, path)


# ----------------------------------------------------------------------------------------------
# Access checks, before anything is compiled: one line naming the path and the fix.
# ----------------------------------------------------------------------------------------------
_CREDENTIALS_FIX = ("run `gcloud auth application-default login`, set "
                    "GOOGLE_APPLICATION_CREDENTIALS to a service-account key, or run on a VM "
                    "whose service account may use the bucket")


def _check_credentials(path: str) -> None:
  """Application-default credentials exist (skipped for a local GCS emulator)."""
  if os.environ.get("STORAGE_EMULATOR_HOST"):
    return
  import google.auth  # pylint: disable=g-import-not-at-top
  from google.auth import exceptions  # pylint: disable=g-import-not-at-top
  try:
    google.auth.default()
  except exceptions.DefaultCredentialsError as e:
    first = " ".join(str(e).split())[:200]
    raise StorageError(f"{path}: no Google Cloud credentials ({first}); "
                       f"{_CREDENTIALS_FIX}.") from None


def _gcs_error(path: str, action: str, error: BaseException) -> StorageError:
  """A gcsfs/HTTP error as one line: missing bucket, permission, credentials, or as is."""
  text = " ".join(str(error).split())
  code = getattr(error, "code", None)
  if isinstance(error, FileNotFoundError):
    return StorageError(f"{path}: bucket gs://{bucket(path)} does not exist (or is not "
                        "visible to these credentials); create it or fix the path.")
  if text.startswith("Forbidden") or code == 403:
    return StorageError(f"{path}: permission denied to {action} ({text[:200]}); grant these "
                        f"credentials access to gs://{bucket(path)} (e.g. "
                        "roles/storage.objectAdmin).")
  if code == 401:
    return StorageError(f"{path}: credentials rejected ({text[:200]}); {_CREDENTIALS_FIX}.")
  return StorageError(f"{path}: cannot {action}: {type(error).__name__}: {text[:300]}")


def check_writable(directory) -> None:
  """Creates `directory` if local, writes and deletes a probe object in it; StorageError."""
  directory = validate(directory)
  probe = f"{directory.rstrip('/')}/.vlm_jax_write_probe-{uuid.uuid4().hex}"
  if not is_gcs(directory):
    try:
      os.makedirs(directory, exist_ok=True)
      with builtins.open(probe, "wb") as f:
        f.write(b"\0")
      os.remove(probe)
    except OSError as e:
      raise StorageError(f"{directory}: cannot be written ({e.strerror or e}); choose a "
                         "writable directory.") from None
    return
  _check_credentials(directory)
  fs = _gcs()
  try:
    fs.pipe_file(probe, b"\0")
    fs.rm_file(probe)
  except Exception as e:  # gcsfs raises OSError, HttpError or ValueError per HTTP status
    raise _gcs_error(directory, "write", e) from None


def check_readable(path) -> None:
  """`path` (a file, a directory, or a glob pattern matching something) can be read."""
  path = validate(path)
  is_pattern = any(c in path for c in "*?[")
  if not is_gcs(path):
    found = glob(path) if is_pattern else os.path.exists(path)
    if not found:
      raise StorageError(f"{path}: {'no file matches' if is_pattern else 'does not exist'}.")
    return
  _check_credentials(path)
  fs = _gcs()
  try:
    found = fs.glob(path) if is_pattern else fs.exists(path)
    if not found and not fs.exists(bucket(path)):
      raise FileNotFoundError(path)
  except Exception as e:  # gcsfs raises OSError, HttpError or ValueError per HTTP status
    raise _gcs_error(path, "read", e) from None
  if not found:
    raise StorageError(f"{path}: {'no object matches' if is_pattern else 'does not exist'}.")
