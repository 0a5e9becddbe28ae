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
import json
import os

import sentencepiece as spm

from vlm_jax import storage

# The shipped model's layout (training the sample model, tests); code reads a Vocab's ids.
PAD_ID, EOS_ID, UNK_ID, BOS_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ("<image>", "<|endofchunk|>", "[vqa]", "[caption]", "[grounding]",
                  "[refer]", "[detection]", "[identify]")
NUM_RESERVED = 128
RESERVED_TOKENS = tuple(f"<reserved_{i}>" for i in range(NUM_RESERVED))

# Package data (setup.py), so a non-editable install has it too.
SAMPLE_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer",
                            "sample.model")
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token")


def resolve_path(path: str = "") -> str:
  return path or os.environ.get("VLM_JAX_VOCAB") or SAMPLE_MODEL


def read_files(path: str) -> dict:
  """{file name: bytes} of the tokenizer at `path` (a file, or a directory's tokenizer
  files); raises FileNotFoundError naming config.data.vocab_path."""
  where = f"(config.data.vocab_path {path!r})"
  if not storage.exists(path):
    raise FileNotFoundError(f"tokenizer {path!r} not found {where}.")
  if not storage.isdir(path):
    if not path.endswith(".json"):  # a SentencePiece model
      return {os.path.basename(path.rstrip("/")): storage.read_bytes(path)}
    # an HF tokenizer.json (any name), with the config files beside it
    directory = str(storage.as_path(path).parent)
    files = {"tokenizer.json": storage.read_bytes(path)}
    for name in HF_FILES[1:]:
      if storage.exists(storage.join(directory, name)):
        files[name] = storage.read_bytes(storage.join(directory, name))
    return files
  names = set(storage.listdir(path))
  wanted = [n for n in HF_FILES if n in names] if "tokenizer.json" in names else (
      sorted(n for n in names if n.endswith(".model"))[:1])
  if not wanted:
    raise FileNotFoundError(f"{path!r} holds neither tokenizer.json nor a SentencePiece "
                            f"*.model {where}.")
  return {n: storage.read_bytes(storage.join(path, n)) for n in wanted}


# ----------------------------------------------------------------------------------------
# The tokenizer libraries: built from {file name: bytes}; encode (without start/end ids),
# decode, token_id (None when absent), vocab_size, special ids (None when absent; pad falls
# back to eos) and start_ids.
# ----------------------------------------------------------------------------------------
def _or_none(i: int):
  return None if i < 0 else i


class SentencePiece:

  def __init__(self, files: dict, path: str):
    (proto,) = files.values()
    self._sp = spm.SentencePieceProcessor(model_proto=proto)
    self.eos_id = _or_none(self._sp.eos_id())
    if self.eos_id is None:
      raise ValueError(f"{path}: the SentencePiece model has no eos id "
                       "(config.data.vocab_path).")
    self.bos_id, self.unk_id = _or_none(self._sp.bos_id()), _or_none(self._sp.unk_id())
    pad = _or_none(self._sp.pad_id())
    self.pad_id = self.eos_id if pad is None else pad
    self.start_ids = [] if self.bos_id is None else [self.bos_id]  # LlamaTokenizer's too
    self.vocab_size = self._sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text, out_type=int)

  def decode(self, ids) -> str:
    return self._sp.decode(list(ids))

  def token_id(self, piece: str):
    i = self._sp.piece_to_id(piece)
    return None if i == self._sp.unk_id() and piece != self._sp.id_to_piece(i) else i


def _content(token):
  """A special token as the config files write it: a string or an AddedToken dict."""
  return token.get("content") if isinstance(token, dict) else token


class HuggingFace:
  """tokenizer.json through the `tokenizers` library, with the special and added tokens of
  tokenizer_config.json / special_tokens_map.json (the latter wins, as in transformers)."""

  def __init__(self, files: dict, path: str):
    import tokenizers  # pylint: disable=g-import-not-at-top
    self._tok = tokenizers.Tokenizer.from_str(files["tokenizer.json"].decode())
    configs = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
      if name in files:
        try:
          configs.update({k: v for k, v in json.loads(files[name]).items() if v is not None})
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}/{name}: not JSON ({e}); config.data.vocab_path") from None
    declared = {int(i): t for i, t in configs.get("added_tokens_decoder", {}).items()}
    extra = [_content(t) for t in configs.get("additional_special_tokens", [])]
    wanted = [_content(configs[k]) for k in SPECIALS if k in configs]
    missing = [t for t in dict.fromkeys(wanted + extra + [_content(t) for t in
                                                          declared.values()])
               if self._tok.token_to_id(t) is None]
    if missing:  # transformers adds them on load; so do we, at the ids it would give
      self._tok.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in missing])
    for i, token in declared.items():
      if self._tok.token_to_id(_content(token)) != i:
        raise ValueError(f"{path}: tokenizer_config.json gives {_content(token)!r} id {i}, "
                         f"tokenizer.json {self._tok.token_to_id(_content(token))} "
                         "(config.data.vocab_path).")
    ids = {k: self._tok.token_to_id(_content(configs[k])) if k in configs else None
           for k in SPECIALS}
    self.bos_id, self.eos_id, self.unk_id = ids["bos_token"], ids["eos_token"], ids["unk_token"]
    if self.eos_id is None:
      raise ValueError(f"{path}: no eos_token in tokenizer_config.json or special_tokens_map"
                       ".json (config.data.vocab_path); write them with transformers' "
                       "save_pretrained (docs/weights.md).")
    self.pad_id = self.eos_id if ids["pad_token"] is None else ids["pad_token"]
    self.start_ids = self._start_ids()
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

  def _start_ids(self) -> list[int]:
    """What the post-processor puts before a text (transformers' tokenizer(text) does)."""
    plain = self.encode("a")
    full = self._tok.encode("a", add_special_tokens=True).ids
    for k in range(len(full) - len(plain) + 1):
      if full[k:k + len(plain)] == plain:
        return full[:k]
    return []

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    return self._tok.decode(list(ids), skip_special_tokens=True)

  def token_id(self, piece: str):
    return self._tok.token_to_id(piece)


class Vocab:
  """A picklable tokenizer (grain ships it to worker processes) with its special ids."""

  def __init__(self, path: str = ""):
    self.path = resolve_path(path)
    self._files = read_files(self.path)
    self._load()

  def _load(self):
    kind = HuggingFace if "tokenizer.json" in self._files else SentencePiece
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

  @property
  def placeholder_id(self) -> int:
    """An id for slots whose embeddings the model overwrites (image slots): unk, else pad."""
    return self.pad_id if self.unk_id is None else self.unk_id

  def require_bos(self, why: str) -> int:
    if self.bos_id is None:
      raise ValueError(f"{why} needs a bos token; config.data.vocab_path {self.path!r} has "
                       "none.")
    return self.bos_id
