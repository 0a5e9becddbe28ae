"""SentencePiece vocabulary: loading by path, encode/decode, fixed special ids.

Ids 0-3 are pad, eos, unk, bos for every model we ship (docs/architecture.md). Ids from 4
are user-defined symbols that families need later (`<image>`, task identifiers), then a
block of reserved symbols that a later tokenizer can rename (e.g. location tokens) without
moving any id a checkpoint was trained with.
"""
import os

import sentencepiece as spm

from vlm_jax import storage

PAD_ID, EOS_ID, UNK_ID, BOS_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ("<image>", "<|endofchunk|>", "[vqa]", "[caption]", "[grounding]",
                  "[refer]", "[detection]", "[identify]")
NUM_RESERVED = 128
RESERVED_TOKENS = tuple(f"<reserved_{i}>" for i in range(NUM_RESERVED))

# Package data (setup.py), so a non-editable install has it too.
SAMPLE_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer",
                            "sample.model")


def resolve_path(path: str = "") -> str:
  return path or os.environ.get("VLM_JAX_VOCAB") or SAMPLE_MODEL


class Vocab:
  """A picklable SentencePiece wrapper (grain ships it to worker processes)."""

  def __init__(self, path: str = ""):
    self.path = resolve_path(path)
    if not storage.exists(self.path):
      raise FileNotFoundError(f"SentencePiece model {self.path!r} not found "
                              "(config data.vocab_path).")
    self._proto = storage.read_bytes(self.path)  # local or gs://
    self._load()

  def _load(self):
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    ids = (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id(), self._sp.bos_id())
    if ids != (PAD_ID, EOS_ID, UNK_ID, BOS_ID):
      raise ValueError(f"{self.path}: pad/eos/unk/bos ids are {ids}, expected 0/1/2/3.")

  def __getstate__(self):
    return {"path": self.path, "_proto": self._proto}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._load()

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text, out_type=int)

  def decode(self, ids) -> str:
    """Decodes up to the first EOS, ignoring pad and bos."""
    out = []
    for i in (int(i) for i in ids):
      if i == EOS_ID:
        break
      if i not in (PAD_ID, BOS_ID):
        out.append(i)
    return self._sp.decode(out)

  def token_id(self, piece: str) -> int:
    i = self._sp.piece_to_id(piece)
    if i == UNK_ID and piece != self._sp.id_to_piece(UNK_ID):
      raise KeyError(f"{piece!r} is not in {self.path}")
    return i
