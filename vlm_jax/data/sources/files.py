"""File handles opened lazily per process, so a source pickles to grain's worker processes
(an open file cannot) and its shards are read by offset, never loaded whole (gs://: one
ranged GET per read)."""
import os
import threading

from vlm_jax import storage


class LazyFiles:
  """Per-process cache of read-only file descriptors.

  Reads use os.pread (no shared seek position) because grain's prefetch threads read the
  same shard concurrently.
  """

  def __init__(self):
    self._pid, self._fds = None, {}

  def _fd(self, path):
    if self._pid != os.getpid():
      self._pid, self._fds = os.getpid(), {}
    if path not in self._fds:
      self._fds[path] = os.open(path, os.O_RDONLY)
    return self._fds[path]

  def read(self, path, offset, size) -> bytes:
    if storage.is_gcs(path):
      data = storage.read_range(path, offset, size)
    else:
      data = os.pread(self._fd(path), size, offset)
    if len(data) != size:
      raise OSError(f"{path}: short read at {offset} ({len(data)} of {size} bytes)")
    return data

  def __getstate__(self):
    return {}

  def __setstate__(self, state):
    self.__init__()


class LazyReaders(LazyFiles):
  """ArrayRecordReaders per process and thread (grain prefetches with threads), opened for
  random access (no read-ahead)."""

  def get(self, path):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    if self._pid != os.getpid():
      self._pid, self._fds = os.getpid(), {}
    slot = (path, threading.get_ident())
    if slot not in self._fds:
      self._fds[slot] = array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0")
    return self._fds[slot]
