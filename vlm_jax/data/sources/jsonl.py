"""Text documents in jsonl files as a random-access source: line offsets indexed once."""
import os

from vlm_jax import storage
from vlm_jax.data.sources.files import LazyFiles


class JsonlTextSource:
  """Text documents, one json object per line with a text field."""

  def __init__(self, paths, field: str = "text"):
    self.paths = sorted(paths)
    if not self.paths:
      raise FileNotFoundError("JsonlTextSource: no jsonl files given.")
    self.field = field
    self._records = []  # (file number, offset, size)
    for number, path in enumerate(self.paths):
      offset = 0
      with storage.open(path, "rb") as f:
        for line in f:
          if line.strip():
            self._records.append((number, offset, len(line)))
          offset += len(line)
    self._files = LazyFiles()

  def __len__(self):
    return len(self._records)

  def __getitem__(self, index):
    number, offset, size = self._records[index]
    path = self.paths[number]
    line = self._files.read(path, offset, size)
    return {"source": path, "key": f"{os.path.basename(path)}:{offset}", "image": None,
            "text": line.decode("utf-8", "replace"), "meta": None, "json_field": self.field}

  def __repr__(self):
    return f"JsonlTextSource({len(self.paths)} files, {len(self)} documents)"
