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
  return config, vocab_lib.Vocab(config.data.vocab_path)


def describe(vocab: vocab_lib.Vocab) -> str:
  return (f"vocabulary {vocab.path}: {vocab.vocab_size} tokens, pad {vocab.pad_id}, eos "
          f"{vocab.eos_id}, bos {vocab.bos_id}, unk {vocab.unk_id}, prompts start with "
          f"{vocab.start_ids}")
