import numpy as np
import pytest

from vlm_jax.data import preprocessors
from vlm_jax.data.families import simvlm as converters
from vlm_jax.data.vocab import BOS_ID, EOS_ID, PAD_ID

CFG = converters.PrefixLMConfig(prefix_length=6, suffix_length=8, image_size=4,
                                pair_zero_prefix_prob=0.3)


def _check_layout(ex, cfg=CFG):
  shapes = {"images": (1, cfg.image_size, cfg.image_size, 3), "image_mask": (1,),
            "prefix_tokens": (cfg.prefix_length,), "prefix_mask": (cfg.prefix_length,),
            "tokens": (cfg.suffix_length,), "targets": (cfg.suffix_length,),
            "loss_mask": (cfg.suffix_length,), "loss_weight": ()}
  assert {k: v.shape for k, v in ex.items()} == shapes
  for key in ("prefix_tokens", "tokens", "targets"):
    assert ex[key].dtype == np.int32
  for key in ("images", "image_mask", "prefix_mask", "loss_mask", "loss_weight"):
    assert ex[key].dtype == np.float32
  n = int(ex["loss_mask"].sum())
  # tokens = BOS + suffix[:-1] in the valid slots; targets = suffix + EOS.
  assert ex["tokens"][0] == BOS_ID
  np.testing.assert_array_equal(ex["tokens"][1:n], ex["targets"][:n - 1])
  assert ex["targets"][n - 1] == EOS_ID
  assert (ex["targets"][n:] == PAD_ID).all() and (ex["tokens"][n:] == PAD_ID).all()
  assert (ex["loss_mask"][:n] == 1).all() and (ex["loss_mask"][n:] == 0).all()
  p = int(ex["prefix_mask"].sum())
  assert (ex["prefix_tokens"][p:] == PAD_ID).all() and (ex["prefix_mask"][:p] == 1).all()
  return p, n


def test_pair_split_covers_caption_and_loss_only_on_suffix():
  ids = list(range(10, 17))
  rng = np.random.default_rng(0)
  image = np.full((4, 4, 3), 0.5, np.float32)
  prefix_lengths = []
  for _ in range(300):
    ex = converters.prefix_lm_pair(image, ids, CFG, rng)
    p, n = _check_layout(ex)
    prefix_lengths.append(p)
    # prefix + suffix is the caption; the prefix never appears among the targets.
    assert list(ex["prefix_tokens"][:p]) + list(ex["targets"][:n - 1]) == ids
    assert ex["image_mask"][0] == 1 and ex["images"][0, 0, 0, 0] == 0.5
  counts = np.bincount(prefix_lengths, minlength=7)
  assert abs(counts[0] / 300 - 0.3) < 0.08
  assert counts[1:7].min() > 0 and max(prefix_lengths) <= CFG.prefix_length


def test_long_caption_is_truncated_with_eos():
  ex = converters.prefix_lm_pair(np.zeros((4, 4, 3), np.float32), list(range(10, 40)), CFG,
                                 np.random.default_rng(0), prefix_length=0)
  p, n = _check_layout(ex)
  assert p == 0 and n == CFG.suffix_length
  assert list(ex["targets"][:-1]) == list(range(10, 10 + CFG.suffix_length - 1))


def test_text_document_has_prefix_and_no_image():
  rng = np.random.default_rng(1)
  for length in (2, 5, 40):
    ids = list(range(100, 100 + length))
    ex = converters.prefix_lm_text(ids, CFG, rng, loss_weight=0.5)
    p, n = _check_layout(ex)
    assert p >= 1 and n >= 2
    assert ex["image_mask"][0] == 0 and not ex["images"].any()
    assert ex["loss_weight"] == np.float32(0.5)
    joined = list(ex["prefix_tokens"][:p]) + list(ex["targets"][:n - 1])
    assert joined == ids[joined[0] - 100:joined[0] - 100 + len(joined)]  # a contiguous window
  with pytest.raises(preprocessors.BadRecord, match="shorter than 2"):
    converters.prefix_lm_text([7], CFG, rng)
