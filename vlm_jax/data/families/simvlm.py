"""SimVLM data: PrefixLM examples from image-text pairs and text-only documents, the
`pretrain_simvlm` mixture and the evaluation tasks.

A token sequence is split at a random prefix length p; the encoder sees [image ; prefix]
bidirectionally and the decoder predicts the suffix, so the loss covers only the suffix
(+ EOS). Image-text pairs draw p = 0 with probability `pair_zero_prefix_prob` (pure
captioning, what evaluation asks for) and otherwise uniformly in [1, min(n - 1, Lp)];
text-only documents always have p >= 1 (the encoder needs something to read) and a zero
image with image_mask 0. The batch layout: `vlm_jax.models.simvlm`.
"""
import dataclasses

import numpy as np

from vlm_jax.data import catalog, packing_encoder_decoder, preprocessors
from vlm_jax.data import processor as processor_lib
from vlm_jax.data.synthetic import scenes
from vlm_jax.data import vocab as vocab_lib

# template -> kinds of record it takes (the first template of a kind is its default)
TEMPLATES = {"prefix_lm": ("pairs", "text")}
# SimVLM trains pairs and text-only PrefixLM in the same batches; pairs dominate because
# captioning is what the sample run is judged on.
MIXTURES = {"pretrain_simvlm": (("synthetic_pairs", 0.8), ("synthetic_text", 0.2))}
# Encoder-decoder rows pack several examples (config.data.packing).
PACKING = packing_encoder_decoder.EncoderDecoderLayout()
_CAPTION = ("exact_match", "cider", "bleu4")
EVAL_TASKS = (
    catalog.EvalTask("simvlm_scenes", "synthetic_pairs", keep=scenes.is_scene, captions=True),
    catalog.EvalTask("simvlm_rendered_text", "synthetic_pairs",
                     keep=lambda raw: not scenes.is_scene(raw), num_examples=16),
    catalog.EvalTask("simvlm_rank_captions", "synthetic_pairs", kind="rank",
                     keep=scenes.is_scene, num_examples=16),
    catalog.EvalTask("simvlm_zero_shot_shapes", "synthetic_pairs", kind="zero_shot",
                     **scenes.ZERO_SHOT_SHAPES, num_examples=16),
)


@dataclasses.dataclass(frozen=True)
class PrefixLMConfig:
  prefix_length: int = 16  # Lp: encoder text slots
  suffix_length: int = 32  # Ls: decoder slots; suffix is cut to Ls - 1 tokens + EOS
  image_size: int = 64
  pair_zero_prefix_prob: float = 0.5
  # The vocabulary's ids (the Processor passes its Vocab's; defaults: the shipped model's).
  bos_id: int = vocab_lib.BOS_ID
  eos_id: int = vocab_lib.EOS_ID
  pad_id: int = vocab_lib.PAD_ID


def _pad(ids, length, pad_id):
  out = np.full((length,), pad_id, np.int32)
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
  targets = suffix + [cfg.eos_id]
  return {
      "images": image[None].astype(np.float32),
      "image_mask": np.asarray([image_mask], np.float32),
      "prefix_tokens": _pad(prefix, cfg.prefix_length, cfg.pad_id),
      "prefix_mask": _mask(len(prefix), cfg.prefix_length),
      "tokens": _pad([cfg.bos_id] + suffix, cfg.suffix_length, cfg.pad_id),
      "targets": _pad(targets, cfg.suffix_length, cfg.pad_id),
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
    raise preprocessors.BadRecord("document shorter than 2 tokens")
  p = _uniform_prefix(len(ids), cfg, rng)
  image = np.zeros((cfg.image_size, cfg.image_size, 3), np.float32)
  return _layout(image, 0.0, ids[:p], ids[p:], loss_weight, cfg)


class Processor(processor_lib.RecordProcessor):
  """Raw record -> SimVLM example (PrefixLM pair or text document). For evaluation, pairs
  get no prefix: the decoder captions from BOS."""

  def __init__(self, data_config, seed, evaluation: bool = False):
    super().__init__(data_config, seed, evaluation)
    self.cfg = PrefixLMConfig(
        prefix_length=data_config.prefix_length, suffix_length=data_config.suffix_length,
        image_size=data_config.image_size,
        pair_zero_prefix_prob=data_config.pair_zero_prefix_prob,
        bos_id=self.vocab.require_bos("SimVLM's decoder"), eos_id=self.vocab.eos_id,
        pad_id=self.vocab.pad_id)
    self.pair_prefix_length = 0 if evaluation else None

  def text_ids(self, text):
    ids = self.vocab.encode(text)
    if not ids:
      raise preprocessors.BadRecord("text encodes to no tokens")
    return ids

  def convert(self, spec, raw, rng):
    if spec.kind == "pairs":
      image = preprocessors.load_image(raw["image"], self.cfg.image_size,
                                       self.data_config.resize_mode,
                                       self.data_config.max_pixels)
      ids = self.text_ids(preprocessors.caption_of(raw))
      return prefix_lm_pair(image, ids, self.cfg, rng, spec.loss_weight,
                            self.pair_prefix_length)
    text = raw["text"]
    if raw.get("json_field"):
      text = preprocessors.text_from_json_line(text, raw["json_field"])
    ids = self.text_ids(preprocessors.clean_text(text))
    return prefix_lm_text(ids, self.cfg, rng, spec.loss_weight)
