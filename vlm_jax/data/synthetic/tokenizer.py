"""Trains the shipped sample tokenizer (vlm_jax/data/tokenizer/sample.model), deterministically.

Regenerate with `vlm-data train-tokenizer --output vlm_jax/data/tokenizer/sample`. The corpus comes
straight from the scene grammar (captions, rendered words, documents) with a fixed seed, so
the model does not depend on any generated data dir.
"""
import io

import numpy as np
import sentencepiece as spm

from vlm_jax.data import vocab
from vlm_jax.data.synthetic import scenes

VOCAB_SIZE = 1024


def corpus(seed: int = 0, num_lines: int = 20_000) -> list[str]:
  rng = np.random.default_rng(seed)
  lines = list(scenes.WORDS)
  for i in range(num_lines):
    kind = i % 3
    if kind == 0:
      lines.append(scenes.describe(scenes.sample_scene(rng)))
    elif kind == 1:
      lines.append(scenes.sample_words(rng))
    else:
      lines.append(scenes.sample_document(rng))
  return lines


def train(output_prefix: str, vocab_size: int = VOCAB_SIZE) -> str:
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus()), model_writer=model, model_type="bpe",
      vocab_size=vocab_size, hard_vocab_limit=False, character_coverage=1.0, byte_fallback=True,
      pad_id=vocab.PAD_ID, eos_id=vocab.EOS_ID, unk_id=vocab.UNK_ID, bos_id=vocab.BOS_ID,
      user_defined_symbols=list(vocab.SPECIAL_TOKENS + vocab.RESERVED_TOKENS),
      num_threads=1, shuffle_input_sentence=False, seed_sentencepiece_size=100_000,
      minloglevel=2)
  path = output_prefix + ".model"
  with open(path, "wb") as f:
    f.write(model.getvalue())
  return path
