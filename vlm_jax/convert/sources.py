"""Checkpoints other than an HF safetensors directory: a torch state-dict file read safely,
and several checkpoints seen as one (a released model spread over files).

Both offer `checkpoint.Checkpoint`'s interface (`tensors`, `shape`, `dtype`, `file`,
`read`, `source`, `close`, a context manager), so `transfer.plan_import` and `load` take
them unchanged.

A torch file (`.pt`, `.pth`, `.bin`) is opened with `torch.load(weights_only=True)`:
torch's restricted unpickler rebuilds tensors, numbers, strings and plain containers and
refuses any other object, so a downloaded file cannot run code while it is read (a file
that needs more is refused with the unpickler's reason). Tensors are memory-mapped
(`mmap=True`) when the file is in torch's zip format, so one tensor is in memory at a time.
"""
import os
import pickle

import ml_dtypes
import numpy as np

from vlm_jax.convert import checkpoint as ckpt_lib
from vlm_jax.convert.checkpoint import ConversionError

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
# Keys under which training scripts nest the model's state dict (MiniGPT-4: "model";
# OpenFlamingo's training checkpoints: "model_state_dict").
NESTED_KEYS = ("model", "model_state_dict", "state_dict", "module")


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top  (optional: torch files only)
  except ImportError as e:
    raise ConversionError("reading a torch checkpoint (.pt/.pth/.bin) needs torch "
                          "(pip install torch, CPU is enough).") from e
  return torch


class TorchCheckpoint(ckpt_lib.TensorTable):
  """The tensors of a torch state-dict file: the file's dict itself when it holds tensors,
  else the first of NESTED_KEYS that does (a training script's `{"model": ..., ...}`)."""

  def __init__(self, path: str):
    torch = _torch()
    self.path = self.source = os.path.abspath(path)
    self.directory = os.path.dirname(self.path)
    if not os.path.isfile(self.path):
      raise ConversionError(f"checkpoint {self.path!r} does not exist.")
    try:
      try:
        data = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
      except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
        data = torch.load(self.path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
      raise ConversionError(f"{self.path}: not a plain state dict; torch's safe loader "
                            f"(weights_only=True) refused it: {str(e).splitlines()[0]}") from e
    self._state = self._select(data, torch)
    self.tensors = {name: (self.path, tuple(t.shape), str(t.dtype).removeprefix("torch."))
                    for name, t in self._state.items()}

  def _select(self, data, torch) -> dict:
    def tensors_of(d):
      return isinstance(d, dict) and d and all(isinstance(v, torch.Tensor) for v in d.values())
    if not tensors_of(data) and isinstance(data, dict):
      data = next((data[k] for k in NESTED_KEYS if tensors_of(data.get(k))), data)
    if not tensors_of(data):
      keys = sorted(data)[:8] if isinstance(data, dict) else "-"
      raise ConversionError(f"{self.path}: expected a dict of tensors (a state dict), found "
                            f"{type(data).__name__} with keys {keys}.")
    return data

  def config(self) -> dict:
    raise ConversionError(f"{self.path} is a bare state dict: it has no config.json.")

  def read(self, name: str) -> np.ndarray:
    torch = _torch()
    tensor = self._state[name].detach().contiguous()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
      return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()

  def close(self):
    pass


def open_checkpoint(path: str):
  """A torch state-dict file by its suffix, else an HF safetensors checkpoint."""
  if os.path.isfile(path) and path.endswith(TORCH_SUFFIXES):
    return TorchCheckpoint(path)
  return ckpt_lib.Checkpoint(path)


class Combined(ckpt_lib.TensorTable):
  """Several checkpoints as one: tensor `f"{part}:{name}"` is tensor `name` of `parts[part]`
  (e.g. OpenFlamingo's `checkpoint:perceiver.latents` and `lm:transformer.wte.weight`)."""

  def __init__(self, parts: dict):
    self.parts = dict(parts)
    self.tensors = {f"{part}:{name}": info for part, ckpt in self.parts.items()
                    for name, info in ckpt.tensors.items()}
    self.source = ", ".join(f"{part}={ckpt.source}" for part, ckpt in self.parts.items())

  def _split(self, name: str):
    part, _, inner = name.partition(":")
    return self.parts[part], inner

  def config(self, part: str) -> dict:
    return self.parts[part].config()

  def read(self, name: str) -> np.ndarray:
    checkpoint, inner = self._split(name)
    return checkpoint.read(inner)

  def close(self):
    for checkpoint in self.parts.values():
      checkpoint.close()
