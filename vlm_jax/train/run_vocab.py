"""A run's tokenizer: `vlm-convert import ... --workdir RUN --tokenizer PATH` copies the
release's tokenizer files (`vocab.read_files`: a SentencePiece model, or tokenizer.json with
its tokenizer_config.json / special_tokens_map.json) into RUN/tokenizer/, so that
`vlm-eval` / `vlm-train --workdir RUN` tokenize with it without a flag. An explicit
config.data.vocab_path (or $VLM_JAX_VOCAB) wins over the recorded one."""
import os

from vlm_jax import storage
from vlm_jax.data import vocab as vocab_lib

SUBDIR = "tokenizer"


def record(workdir: str, path: str) -> vocab_lib.Vocab:
  """Copies the tokenizer at `path` into workdir/tokenizer/ (after checking that it loads)."""
  vocab = vocab_lib.Vocab(path)
  for name, data in vocab_lib.read_files(vocab.path).items():
    storage.write_atomic(storage.join(workdir, SUBDIR, name), data)
  return vocab


def resolve(config, workdir: str):
  """(config with data.vocab_path set to the run's recorded tokenizer when the config names
  none, its Vocab)."""
  recorded = storage.join(workdir, SUBDIR)
  explicit = config.data.vocab_path or os.environ.get("VLM_JAX_VOCAB")
  if not explicit and storage.exists(recorded):
    config.data.vocab_path = recorded
  vocab = vocab_lib.Vocab(config.data.vocab_path)
  check(config, vocab)
  return config, vocab


def check(config, vocab: vocab_lib.Vocab) -> None:
  """The model can read the vocabulary's ids: every id has an embedding row (a gather past
  the table would clamp silently), and Flamingo's trained rows are its `<image>` and
  `<|endofchunk|>` (config.model.new_token_ids)."""
  where = f"config.data.vocab_path {vocab.path!r}"
  rows = config.model.get("lm", {}).get("vocab_size")  # a plug-in family may have no lm
  if rows is not None and vocab.vocab_size > rows:
    raise ValueError(f"{where} has {vocab.vocab_size} tokens, more than "
                     f"config.model.lm.vocab_size={rows}.")
  new_ids = config.model.get("new_token_ids")
  if new_ids is not None:
    try:
      wanted = tuple(vocab.token_id(t) for t in ("<image>", "<|endofchunk|>"))
    except KeyError as e:
      raise ValueError(f"Flamingo's <image> / <|endofchunk|>: {e.args[0]}") from None
    if tuple(new_ids) != wanted:
      raise ValueError(f"config.model.new_token_ids={tuple(new_ids)}, but <image> and "
                       f"<|endofchunk|> are {wanted} in {where}.")


def describe(vocab: vocab_lib.Vocab) -> str:
  return (f"vocabulary {vocab.path} ({vocab.vocab_size} tokens, pad {vocab.pad_id}, eos "
          f"{vocab.eos_id}, bos {vocab.bos_id}, unk {vocab.unk_id}, prompts start with "
          f"{vocab.start_ids})")
