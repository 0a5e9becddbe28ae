"""Vocabularies: loading by path (`config.data.vocab_path`), encode/decode, special ids.

`Vocab(path)` reads, locally or from gs:// (`vlm_jax.storage`):
  - a SentencePiece model (`*.model`), any id layout (ours, LLaMA-2's unk/bos/eos 0/1/2
    without pad, ...);
  - a Hugging Face tokenizer: a directory holding `tokenizer.json` (read with the
    `tokenizers` library; bos/eos/unk/pad and added tokens such as OpenFlamingo's `<image>`
    and `<|endofchunk|>` from tokenizer.json, tokenizer_config.json and
    special_tokens_map.json), or that `tokenizer.json` itself. A directory without
    tokenizer.json is read as the SentencePiece model it holds (`tokenizer.model`).

Its special ids are attributes (`pad_id`, `eos_id`, `bos_id`, `unk_id`; bos/unk are None when
the tokenizer has none). A tokenizer without a pad token pads with its eos id: padding is
masked everywhere (token_mask / loss_mask), and generation stops at eos before it.
`start_ids` are the ids its tokenizer puts before a text (LLaMA's and ours: [bos];
GPT-NeoX's: none), so prompts begin as the release's own tokenizer begins them.

The model we ship (SAMPLE_MODEL, `vlm_jax.data.synthetic.tokenizer`) has pad, eos, unk, bos
= 0-3 (SHIPPED_IDS' order), then user-defined symbols that families need (`<image>`, task
identifiers), then a block of reserved symbols that a later tokenizer can rename (e.g.
location tokens) without moving any id a checkpoint was trained with.
"""
import os

from vlm_jax import storage
from vlm_jax.data import vocab_backends

# The shipped model's layout (training the sample model, tests); code reads a Vocab's ids.
PAD_ID, EOS_ID, UNK_ID, BOS_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ("<image>", "<|endofchunk|>", "[vqa]", "[caption]", "[grounding]",
                  "[refer]", "[detection]", "[identify]")
NUM_RESERVED = 128
RESERVED_TOKENS = tuple(f"<reserved_{i}>" for i in range(NUM_RESERVED))

# Package data (setup.py), so a non-editable install has it too.
SAMPLE_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer",
                            "sample.model")
HF_FILES = vocab_backends.HF_FILES


def resolve_path(path: str = "") -> str:
  return path or os.environ.get("VLM_JAX_VOCAB") or SAMPLE_MODEL


def read_files(path: str) -> dict:
  """{file name: bytes} of the tokenizer at `path` (a file, or a directory's tokenizer
  files); raises FileNotFoundError naming config.data.vocab_path."""
  where = f"(config.data.vocab_path {path!r})"
  if not storage.exists(path):
    raise FileNotFoundError(f"tokenizer {path!r} not found {where}.")
  if not storage.isdir(path):
    return {os.path.basename(path.rstrip("/")): storage.read_bytes(path)}
  names = set(storage.listdir(path))
  wanted = [n for n in HF_FILES if n in names] if "tokenizer.json" in names else (
      sorted(n for n in names if n.endswith(".model"))[:1])
  if not wanted:
    raise FileNotFoundError(f"{path!r} holds neither tokenizer.json nor a SentencePiece "
                            f"*.model {where}.")
  return {n: storage.read_bytes(storage.join(path, n)) for n in wanted}


class Vocab:
  """A picklable tokenizer (grain ships it to worker processes) with its special ids."""

  def __init__(self, path: str = ""):
    self.path = resolve_path(path)
    self._files = read_files(self.path)
    self._load()

  def _load(self):
    kind = (vocab_backends.HuggingFace if "tokenizer.json" in self._files
            else vocab_backends.SentencePiece)
    self._backend = kind(self._files, self.path)
    self.pad_id, self.eos_id, self.bos_id, self.unk_id = (
        self._backend.pad_id, self._backend.eos_id, self._backend.bos_id,
        self._backend.unk_id)
    self.start_ids = list(self._backend.start_ids)

  def __getstate__(self):
    return {"path": self.path, "_files": self._files}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._load()

  @property
  def vocab_size(self) -> int:
    return self._backend.vocab_size

  @property
  def is_shipped_layout(self) -> bool:
    return (self.pad_id, self.eos_id, self.unk_id, self.bos_id) == (PAD_ID, EOS_ID, UNK_ID,
                                                                   BOS_ID)

  def encode(self, text: str) -> list[int]:
    """The text's ids, without the tokenizer's start/end ids."""
    return self._backend.encode(text)

  def decode(self, ids) -> str:
    """Decodes up to the first eos, leaving out pad, bos and (HF) other special tokens."""
    out = []
    for i in (int(i) for i in ids):
      if i == self.eos_id:
        break
      if i not in (self.pad_id, self.bos_id):
        out.append(i)
    return self._backend.decode(out)

  def token_id(self, piece: str) -> int:
    """The id of one token (e.g. '<image>'); KeyError when the vocabulary lacks it."""
    i = self._backend.token_id(piece)
    if i is None:
      raise KeyError(f"{piece!r} is not a token of {self.path} (config.data.vocab_path)")
    return i

  def require_bos(self, why: str) -> int:
    if self.bos_id is None:
      raise ValueError(f"{why} needs a bos token; config.data.vocab_path {self.path!r} has "
                       "none.")
    return self.bos_id
