"""Shards written by `vlm-data ingest` (ArrayRecord of `records.py` records), any kind."""
import bisect

from vlm_jax.data import records
from vlm_jax.data.sources.files import LazyReaders


class ArrayRecordSource:
  """Records written by `vlm-data ingest` (records.py), any kind."""

  def __init__(self, paths):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    self.paths = sorted(paths)
    if not self.paths:
      raise FileNotFoundError("ArrayRecordSource: no .array_record shards given.")
    self._counts = []
    for path in self.paths:
      reader = array_record_module.ArrayRecordReader(path)
      self._counts.append(reader.num_records())
      reader.close()
    self._starts = [0]
    for count in self._counts:
      self._starts.append(self._starts[-1] + count)
    self._readers = LazyReaders()

  def __len__(self):
    return self._starts[-1]

  def __getitem__(self, index):
    number = bisect.bisect_right(self._starts, index) - 1
    path = self.paths[number]
    position = index - self._starts[number]
    try:
      record = records.decode(self._readers.get(path).read([position])[0])
    except (ValueError, RuntimeError, OSError) as e:
      return {"source": path, "key": f"#{position}", "problem": f"unreadable record: {e}"}
    record.setdefault("image", None)
    return {"source": path, **record}

  def __repr__(self):
    return f"ArrayRecordSource({len(self.paths)} shards, {len(self)} records)"
