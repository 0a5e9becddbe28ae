"""img2dataset webdataset shards as a random-access source (a grain data source).

The tar is indexed once by reading member headers only; a record is then read by offset, so
a shard is never loaded whole and grain can shuffle and shard by index.
"""
import os
import tarfile

from vlm_jax import storage
from vlm_jax.data.sources.files import LazyFiles

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def split_key(name: str):
  """webdataset convention: key = path up to the first dot of the basename."""
  directory, base = os.path.split(name)
  stem, _, ext = base.partition(".")
  return os.path.join(directory, stem), ext.lower()


def _octal(field: bytes) -> int:
  if field[:1] == b"\x80":  # GNU base-256 for sizes >= 8 GiB
    return int.from_bytes(field[1:], "big")
  return int(field.rstrip(b"\0 ").strip() or b"0", 8)


class CorruptTar(ValueError):
  pass


def _scan_ustar(path: str):
  """Yields (name, offset, size) of regular members by reading 512-byte headers only.

  tarfile does the same but builds a TarInfo per member, which is ~20x slower; shards with
  pax or GNU long-name headers fall back to tarfile. Sizes are as the header claims: a
  truncated shard yields a last member that runs past the end of the file.
  """
  file_size = storage.size(path)
  with storage.open(path, "rb") as f:
    offset = 0
    while offset + 512 <= file_size:
      f.seek(offset)
      header = f.read(512)
      if header == b"\0" * 512:
        return
      checksum = sum(header[:148]) + 8 * 32 + sum(header[156:])
      try:
        valid = _octal(header[148:156]) == checksum
        size = _octal(header[124:136])
      except ValueError:
        valid = False
      if not valid:
        raise CorruptTar(f"{path}: corrupt tar header at byte {offset}")
      kind = header[156:157]
      if kind in (b"x", b"g", b"L", b"K"):
        raise NotImplementedError("pax/GNU headers")
      name = header[:100].split(b"\0", 1)[0]
      if header[257:262] == b"ustar" and header[345:346] != b"\0":
        name = header[345:500].split(b"\0", 1)[0] + b"/" + name
      if kind in (b"0", b"\0"):
        yield name.decode("utf-8", "replace"), offset + 512, size
      offset += 512 + (size + 511) // 512 * 512


def _scan_tarfile(path: str):
  with storage.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
    for member in tar:
      if member.isfile():
        yield member.name, member.offset_data, member.size


def _list_members(path):
  """Members up to the first unreadable header; the error, if any, is returned too."""
  members = []
  try:
    try:
      for member in _scan_ustar(path):
        members.append(member)
    except NotImplementedError:
      members = list(_scan_tarfile(path))
  except (CorruptTar, tarfile.TarError) as e:
    return members, str(e)
  return members, None


def unsafe_name(name: str) -> bool:
  """Absolute paths and `..` components: never trusted, even though we never extract."""
  return name.startswith("/") or ".." in name.replace("\\", "/").split("/")


def index_tar(path: str):
  """Lists (key, {ext: (offset, size)}, problem) in member order, reading headers only.

  `problem` is None for a usable record, else why it must be skipped (unsafe name,
  member truncated by a short shard, unreadable header); such records stay in the index
  so that the pipeline counts them like any other bad record.
  """
  file_size = storage.size(path)
  if file_size == 0:
    return [("@0", {}, "zero-byte file")]
  members, error = _list_members(path)
  groups, problems = {}, {}
  for name, offset, size in members:
    key, ext = split_key(name)
    groups.setdefault(key, {})[ext] = (offset, size)
    if unsafe_name(name):
      problems[key] = f"unsafe member name {name!r}"
    elif offset + size > file_size:
      problems[key] = f"truncated member {name!r}"
  out = [(key, members, problems.get(key)) for key, members in groups.items()]
  if error:
    out.append((f"@{len(members)}", {}, f"unreadable tar: {error}"))
  return out


class WebDatasetSource:
  """Image-text pairs from img2dataset webdataset tars: {key}.jpg + .txt (+ .json)."""

  def __init__(self, paths):
    self.paths = sorted(paths)
    if not self.paths:
      raise FileNotFoundError("WebDatasetSource: no tar shards given.")
    self._records = []  # (shard number, key, {ext: (offset, size)}, problem)
    for shard, path in enumerate(self.paths):
      for key, members, problem in index_tar(path):
        if problem is None and not any(ext in members for ext in IMAGE_EXTS):
          problem = "no image member"
        self._records.append((shard, key, members, problem))
    self._files = LazyFiles()

  def __len__(self):
    return len(self._records)

  def __getitem__(self, index):
    shard, key, members, problem = self._records[index]
    path = self.paths[shard]
    record = {"source": path, "key": key, "image": None, "text": None, "meta": None}
    if problem:
      return {**record, "problem": problem}
    image_ext = next(ext for ext in IMAGE_EXTS if ext in members)
    read = lambda ext: self._files.read(path, *members[ext]) if ext in members else None
    try:
      record["image"] = read(image_ext)
      caption, meta = read("txt"), read("json")
    except OSError as e:
      return {**record, "problem": f"read error: {e}"}
    record["text"] = caption.decode("utf-8", "replace") if caption is not None else None
    record["meta"] = meta.decode("utf-8", "replace") if meta is not None else None
    return record

  def __repr__(self):
    return f"WebDatasetSource({len(self.paths)} shards, {len(self)} records)"
