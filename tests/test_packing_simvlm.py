"""Encoder-decoder packing (data/packing_encoder_decoder.py) through SimVLM: rows built by
the real packer from examples the SimVLM processor's functions lay out; no attention across
segments (one segment's loss does not depend on another's prefix or decoder embeddings or on
its image's pixels); the packed loss equals the unpacked examples' summed loss, with learned
and with T5 relative positions; and the pipeline's packed stream resumes exactly."""
import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import builders
import packing_checks
from vlm_jax import config as config_lib
from vlm_jax.data import health
from vlm_jax.data.families import simvlm as data_lib
from vlm_jax.data.synthetic import sample_data
from vlm_jax.train import step as step_lib

VOCAB, IMAGE = 64, 32  # 32 px through the stride-16 stem: 2 x 2 = 4 image tokens
CFG = data_lib.PrefixLMConfig(prefix_length=6, suffix_length=8, image_size=IMAGE)
ROW = dict(packed_prefix_length=10, packed_suffix_length=20, packed_images=2, packing_bins=1,
           image_size=IMAGE)


def _tiny(position):
  lm = dict(vocab_size=VOCAB, width=32, num_heads=4, mlp_dim=48, encoder_layers=2,
            decoder_layers=2, max_text_length=8, position=position)
  return builders.build("simvlm", lm=lm, vision=dict(width=8, stage_blocks=(1, 1, 1)),
                        dropout_rate=0.0, drop_path_rate=0.0)


def _examples():
  """A captioning pair (empty prefix), a PrefixLM pair, a text document (no image) and a
  second PrefixLM pair, as the SimVLM processor lays them out."""
  rng = np.random.default_rng(0)
  image = lambda: rng.uniform(-1, 1, (IMAGE, IMAGE, 3)).astype(np.float32)
  ids = lambda n: list(rng.integers(6, VOCAB, n))
  examples = [data_lib.prefix_lm_pair(image(), ids(5), CFG, rng, 1.0, prefix_length=0),
              data_lib.prefix_lm_pair(image(), ids(7), CFG, rng, 0.5, prefix_length=3),
              data_lib.prefix_lm_text(ids(9), CFG, rng, 2.0),
              data_lib.prefix_lm_pair(image(), ids(10), CFG, rng, 1.0, prefix_length=4)]
  for task, example in enumerate(examples):
    example.update({health.SKIPPED_KEY: np.int32(0), health.TASK_KEY: np.int32(task % 2)})
  return examples


EXAMPLES = _examples()


def _packed_rows(examples):
  ds = grain.MapDataset.source(examples).to_iter_dataset()
  return packing_checks.stack(data_lib.PACKING.pack(ds, ml_collections.ConfigDict(ROW), seed=0))


PACKED, UNPACKED = _packed_rows(EXAMPLES), packing_checks.stack(EXAMPLES)


def test_rows_hold_each_example_in_both_streams_and_its_image_in_its_own_slot():
  # decoder lengths 6, 5, 5 (+ 7 > 20) and prefixes 0, 3, 5 (+ 4 > 10): three in row 0
  np.testing.assert_array_equal(PACKED["segment_ids"][0], [1] * 6 + [2] * 5 + [3] * 5 + [0] * 4)
  np.testing.assert_array_equal(PACKED["prefix_segment_ids"][0], [2] * 3 + [3] * 5 + [0] * 2)
  np.testing.assert_array_equal(PACKED["prefix_positions"][0, :5], [0, 1, 2, 0, 1])
  np.testing.assert_array_equal(PACKED["positions"][0, 9:13], [3, 4, 0, 1])
  # the text document takes no image slot; the last pair starts row 1
  np.testing.assert_array_equal(PACKED["image_segment_ids"], [[1, 2], [1, 0]])
  np.testing.assert_array_equal(PACKED["image_mask"], [[1, 1], [1, 0]])
  np.testing.assert_array_equal(PACKED["images"][0, 1], EXAMPLES[1]["images"][0])
  np.testing.assert_array_equal(PACKED["tokens"][0, 11:16], EXAMPLES[2]["tokens"][:5])
  np.testing.assert_array_equal(PACKED["loss_weight"][0, :12], [1.0] * 6 + [0.5] * 5 + [2.0])
  data = ml_collections.ConfigDict(ROW)
  # real tokens / slots of both streams and the image tokens: 3 images * 4 + 12 + 23 of
  # 2 rows * (2 slots * 4 + 10 + 20)
  assert data_lib.PACKING.efficiency([PACKED], data) == pytest.approx((12 + 12 + 23) / 76)


@pytest.fixture(scope="module", params=["learned", "relative"])
def tiny(request):
  model = _tiny(request.param)
  variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), UNPACKED))
  return model, variables


def test_packed_loss_equals_the_unpacked_examples_loss(tiny):
  model, variables = tiny
  def loss(batch):
    return step_lib.token_cross_entropy(model.apply({"params": variables["params"]}, batch),
                                        batch)
  (num, den), (num_p, den_p) = jax.jit(loss)(UNPACKED), jax.jit(loss)(PACKED)
  assert float(den) == float(den_p) == 23
  np.testing.assert_allclose(num_p, num, rtol=1e-5)


def test_no_attention_across_segments(tiny):
  """Gradients of one segment's loss w.r.t. every other segment's prefix and decoder input
  embeddings and image pixels are exactly zero; w.r.t. its own they are not."""
  model, variables = tiny
  row = {k: v[:1] for k, v in PACKED.items()}

  def segment_loss(perturbations, images, segment):
    batch = dict(row, images=images)
    logits = model.apply({"params": variables["params"], "perturbations": perturbations},
                         batch)
    ce = -jax.nn.log_softmax(logits)[0, jnp.arange(logits.shape[1]), batch["targets"][0]]
    return jnp.sum(ce * batch["loss_mask"][0] * (batch["segment_ids"][0] == segment))

  shapes = jax.eval_shape(lambda: model.apply({"params": variables["params"]}, row,
                                               mutable="perturbations")[1]["perturbations"])
  perturbations = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  grad_fn = jax.jit(jax.grad(segment_loss, argnums=(0, 1)))
  owners = {"prefix_embeddings": row["prefix_segment_ids"][0],
            "suffix_embeddings": row["segment_ids"][0]}
  for mine in (1, 2, 3):
    grads, pixels = grad_fn(perturbations, row["images"], jnp.int32(mine))
    for name, owner in owners.items():
      grad = np.asarray(grads[name])[0]
      assert np.all(grad[(owner != mine) & (owner > 0)] == 0), (name, mine)
      assert np.any(grad[owner == mine] != 0) or not np.any(owner == mine), (name, mine)
    slots = row["image_segment_ids"][0]
    for slot, owner in enumerate(slots):
      assert np.any(pixels[0, slot] != 0) == (owner == mine), (slot, mine)


def test_packed_pipeline_resumes_exactly_and_fills_rows(tmp_path):
  root = str(tmp_path / "data")
  sample_data.ensure_sample_data(root, sample_data.SyntheticSizes(
      train_pairs=100, validation_pairs=8, train_docs=40, validation_docs=4,
      train_interleaved=2, validation_interleaved=2, shard_size=100, image_size=32))
  data = config_lib.load_config_file("configs/simvlm.py:tiny,packed=True").data
  data.data_dir, data.image_size = root, 32
  it, batches = packing_checks.resumed_packed_batches(data, "simvlm", 4)
  assert it.counters["examples"] == sum(int(b["segment_ids"].max(1).sum())
                                        for b in batches) > 5 * 4
  # the sample's captions are short: packed rows hold several examples in both streams
  assert data_lib.PACKING.efficiency(batches, data) > 0.8
  assert set(batches[0]) == {"images", "image_mask", "image_segment_ids", "prefix_tokens",
                           "prefix_mask", "prefix_segment_ids", "prefix_positions", "tokens",
                           "targets", "loss_mask", "loss_weight", "segment_ids", "positions"}
