"""The tokenizer libraries behind `vlm_jax.data.vocab.Vocab`: SentencePiece models and Hugging
Face `tokenizer.json` files. Each is built from {file name: bytes} and exposes encode
(without start/end ids), decode, token_id (None when absent), vocab_size, the special ids
(None when the tokenizer has no such token; pad falls back to eos) and start_ids."""
import json

import sentencepiece as spm

HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token")


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
      raise ValueError(f"{path}: no eos_token in tokenizer_config.json or "
                       "special_tokens_map.json (config.data.vocab_path).")
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
