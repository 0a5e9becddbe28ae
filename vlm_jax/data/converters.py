"""Features -> the fixed-shape model batch layout of a family (docs/architecture.md).

SimVLM PrefixLM: a token sequence is split at a random prefix length p; the encoder sees
[image ; prefix] bidirectionally and the decoder predicts the suffix, so the loss covers
only the suffix (+ EOS). Image-text pairs draw p = 0 with probability
`pair_zero_prefix_prob` (pure captioning, what evaluation asks for) and otherwise
uniformly in [1, min(n - 1, Lp)]; text-only documents always have p >= 1 (the encoder needs
something to read) and a zero image with image_mask 0.
"""
import dataclasses

import numpy as np

from vlm_jax.data.vocab import BOS_ID, EOS_ID, PAD_ID


@dataclasses.dataclass(frozen=True)
class PrefixLMConfig:
  prefix_length: int = 16  # Lp: encoder text slots
  suffix_length: int = 32  # Ls: decoder slots; suffix is cut to Ls - 1 tokens + EOS
  image_size: int = 64
  pair_zero_prefix_prob: float = 0.5


def _pad(ids, length):
  out = np.full((length,), PAD_ID, np.int32)
  out[:len(ids)] = ids
  return out


def _mask(n, length):
  out = np.zeros((length,), np.float32)
  out[:n] = 1.0
  return out


def _uniform_prefix(n, cfg, rng):
  """p in [1, min(n - 1, Lp)], so both sides are non-empty."""
  return int(rng.integers(1, min(n - 1, cfg.prefix_length) + 1))


def _layout(image, image_mask, prefix, suffix, loss_weight, cfg):
  suffix = list(suffix[:cfg.suffix_length - 1])
  targets = suffix + [EOS_ID]
  return {
      "images": image[None].astype(np.float32),
      "image_mask": np.asarray([image_mask], np.float32),
      "prefix_tokens": _pad(prefix, cfg.prefix_length),
      "prefix_mask": _mask(len(prefix), cfg.prefix_length),
      "tokens": _pad([BOS_ID] + suffix, cfg.suffix_length),
      "targets": _pad(targets, cfg.suffix_length),
      "loss_mask": _mask(len(targets), cfg.suffix_length),
      "loss_weight": np.float32(loss_weight),
  }


def prefix_lm_pair(image: np.ndarray, ids, cfg: PrefixLMConfig, rng: np.random.Generator,
                   loss_weight: float = 1.0, prefix_length=None) -> dict:
  """`image` [H, W, 3] in [-1, 1]; `ids` the caption tokens without EOS."""
  n = len(ids)
  if prefix_length is None:
    prefix_length = (0 if n < 2 or rng.random() < cfg.pair_zero_prefix_prob
                     else _uniform_prefix(n, cfg, rng))
  return _layout(image, 1.0, ids[:prefix_length], ids[prefix_length:], loss_weight, cfg)


def prefix_lm_text(ids, cfg: PrefixLMConfig, rng: np.random.Generator,
                   loss_weight: float = 1.0) -> dict:
  """A document longer than Lp + Ls - 1 contributes a random window of that length."""
  window = cfg.prefix_length + cfg.suffix_length - 1
  if len(ids) > window:
    start = int(rng.integers(0, len(ids) - window + 1))
    ids = ids[start:start + window]
  if len(ids) < 2:
    raise ValueError("a text document needs at least 2 tokens")
  p = _uniform_prefix(len(ids), cfg, rng)
  image = np.zeros((cfg.image_size, cfg.image_size, 3), np.float32)
  return _layout(image, 0.0, ids[:p], ids[p:], loss_weight, cfg)
