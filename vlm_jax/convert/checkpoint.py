"""HF checkpoints in safetensors: reading lazily tensor by tensor, and writing in shards.

A checkpoint is a directory (or one `.safetensors` file) with either `model.safetensors` or
an index `model.safetensors.index.json` whose `weight_map` names the shard holding each
tensor. Only the JSON headers are read up front; a tensor's bytes are read when asked for.
Pickle (`pytorch_model.bin`) is refused: loading it runs arbitrary code.

Tensors are read with safetensors' `flax` framework on the host CPU device, because its numpy
framework cannot represent bfloat16; `np.asarray` of the result is an ml_dtypes array.
safetensors opens local files only: a gs:// checkpoint is downloaded to a temporary directory
for the reader's life, and a gs:// output is written locally, then uploaded (index last).
"""
import contextlib
import json
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from vlm_jax import storage

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
# safetensors header dtype names -> numpy names (ml_dtypes provides bfloat16).
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
           "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
           "BOOL": "bool"}


class ConversionError(ValueError):
  """A checkpoint does not fit the model (or cannot be read); the message says where."""


def host_cpu():
  return jax.local_devices(backend="cpu")[0]


class TensorTable:
  """`tensors`: {name: (file, shape, dtype)}; the accessors every checkpoint kind shares, and
  a context manager that calls `close()`."""
  tensors: dict

  def file(self, name: str) -> str:
    return self.tensors[name][0]

  def shape(self, name: str) -> tuple[int, ...]:
    return self.tensors[name][1]

  def dtype(self, name: str) -> str:
    return self.tensors[name][2]

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class Checkpoint(TensorTable):
  """Names, shapes, dtypes and files of a checkpoint's tensors; `read(name)` -> np.ndarray."""

  def __init__(self, path: str):
    self._download = contextlib.ExitStack()
    if storage.is_gcs(path):
      if not storage.exists(path):
        raise ConversionError(f"checkpoint {path!r} does not exist.")
      path = self._download.enter_context(storage.local_copy(path))
    self.path = os.path.abspath(path)
    if os.path.isfile(self.path) and self.path.endswith(".safetensors"):
      self.directory = os.path.dirname(self.path)
      files = {None: self.path}
      self.source = self.path
    elif os.path.isdir(self.path):
      self.directory = self.path
      index, single = os.path.join(self.path, INDEX), os.path.join(self.path, SINGLE)
      if os.path.isfile(index):
        self.source = index
        with open(index) as f:
          weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
          raise ConversionError(f"{index}: no 'weight_map' object.")
        files = {name: os.path.join(self.path, shard) for name, shard in weight_map.items()}
      elif os.path.isfile(single):
        self.source = single
        files = {None: single}
      else:
        pickled = [f for f in os.listdir(self.path) if f.endswith((".bin", ".pt", ".pth"))]
        hint = (f" It holds {pickled[:2]}: pickle checkpoints are not read (they can run "
                "code); re-save with save_pretrained(..., safe_serialization=True).") if pickled else ""
        raise ConversionError(f"{self.path}: neither {SINGLE} nor {INDEX}.{hint}")
    else:
      raise ConversionError(f"checkpoint {self.path!r} is neither a directory nor a "
                            ".safetensors file.")
    indexed = None not in files
    self.tensors: dict[str, tuple[str, tuple[int, ...], str]] = {}  # name -> file, shape, dtype
    for file in sorted(set(files.values())):
      if not os.path.isfile(file):
        raise ConversionError(f"{self.source} names shard {file}, which does not exist.")
      with safe_open(file, framework="flax") as f:
        for name in f.keys():
          if indexed and files.get(name) != file:
            continue  # listed in another shard by the index
          piece = f.get_slice(name)
          dtype = piece.get_dtype()
          self.tensors[name] = (file, tuple(piece.get_shape()), _DTYPES.get(dtype, dtype))
    if indexed:
      absent = sorted(set(files) - set(self.tensors))
      if absent:
        raise ConversionError(f"{self.source} maps {absent[:3]} to shards that do not hold them.")
    self._open: dict[str, Any] = {}

  def config(self) -> dict:
    """The checkpoint's config.json (model_type and hyperparameters)."""
    path = os.path.join(self.directory, CONFIG)
    if not os.path.isfile(path):
      raise ConversionError(f"{self.directory}: no {CONFIG} (save_pretrained writes one).")
    with open(path) as f:
      return json.load(f)

  def read(self, name: str) -> np.ndarray:
    file = self.file(name)
    if file not in self._open:
      self._open[file] = safe_open(file, framework="flax").__enter__()
    with jax.default_device(host_cpu()):
      return np.asarray(self._open[file].get_tensor(name))

  def close(self):
    for handle in self._open.values():
      handle.__exit__(None, None, None)
    self._open.clear()
    self._download.close()


class ShardWriter:
  """Writes tensors into `model-0000i-of-0000n.safetensors` files of at most `max_shard_bytes`
  (one tensor may exceed it) plus the index json, holding one shard in memory at a time."""

  def __init__(self, directory: str, max_shard_bytes: int = 2 << 30):
    self.target, self.max_shard_bytes = directory, max_shard_bytes
    self.directory = tempfile.mkdtemp(prefix="vlm_jax_hf_") if storage.is_gcs(
        directory) else directory
    os.makedirs(self.directory, exist_ok=True)
    self._pending: dict[str, np.ndarray] = {}
    self._pending_bytes = 0
    self._written: list[tuple[str, list[str]]] = []  # temporary file, names
    self.total_bytes = 0

  def add(self, name: str, array: np.ndarray):
    if self._pending and self._pending_bytes + array.nbytes > self.max_shard_bytes:
      self._flush()
    self._pending[name] = array
    self._pending_bytes += array.nbytes
    self.total_bytes += array.nbytes

  def _flush(self):
    path = os.path.join(self.directory, f".shard-{len(self._written)}.tmp")
    # numpy arrays as they are (ml_dtypes' bfloat16 included; through jax, int64 would
    # become int32)
    save_file(dict(self._pending), path, metadata={"format": "pt"})
    self._written.append((path, list(self._pending)))
    self._pending, self._pending_bytes = {}, 0

  def close(self):
    if self._pending or not self._written:
      self._flush()
    self._finish()
    if self.directory != self.target:
      storage.put_tree(self.directory, self.target, last=(INDEX, SINGLE))
      shutil.rmtree(self.directory)

  def _finish(self):
    count = len(self._written)
    if count == 1:
      os.replace(self._written[0][0], os.path.join(self.directory, SINGLE))
      return
    weight_map = {}
    for i, (path, names) in enumerate(self._written):
      shard = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
      os.replace(path, os.path.join(self.directory, shard))
      weight_map.update({name: shard for name in names})
    with open(os.path.join(self.directory, INDEX), "w") as f:
      json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, f,
                indent=2)
