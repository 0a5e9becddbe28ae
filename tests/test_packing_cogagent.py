"""Sequence packing (data/packing.py) through CogAgent: rows built by the real packer from
examples in the processor's layout carry each example's low- and high-res image into its
slot; no attention across segments, neither self-attention nor the high-res cross-attention
(one segment's loss has exactly zero gradient w.r.t. another's input embeddings, spliced
visual tokens included, and its high-res pixels); the visual expert routes the same tokens
as unpacked; the packed loss equals the unpacked examples' summed loss; and the pipeline's
packed stream resumes exactly from a saved iterator state."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import builders
import packing_checks
from vlm_jax import config as config_lib
from vlm_jax.data import health, packing
from vlm_jax.data.families import cogagent as data_lib
from vlm_jax.models import cogagent as model_lib
from vlm_jax.nn import segment_mask
from vlm_jax.train import step as step_lib

VOCAB, LOW, HIGH, LENGTH = 64, 28, 56, 24  # 2x2 + 2 = 6 image slots; 4x4 high-res tokens
SLOTS = model_lib.image_tokens(LOW, 14)
VIT = dict(depth=1, num_heads=2, mlp_dim=32, patch_size=14, class_token=True)
TINY = dict(lm=dict(vocab_size=VOCAB, width=32, num_layers=1, num_heads=4, mlp_dim=48),
            vision=dict(VIT, width=16), high_res=dict(VIT, width=24), adapter=dict(mlp_dim=40),
            cross=dict(width=16, heads=4), visual_expert=True, cross_module=True)


def _example(seed, valid, weight):
  """One processed example as the CogAgent processor lays it out (BOS, the image slots from
  position 1, text; padded to LENGTH)."""
  rng = np.random.default_rng(seed)
  mask = (np.arange(LENGTH) < valid).astype(np.float32)
  tokens = (rng.integers(6, VOCAB, LENGTH) * mask).astype(np.int32)
  return {"images": rng.uniform(-1, 1, (1, LOW, LOW, 3)).astype(np.float32),
          "high_res_images": rng.uniform(-1, 1, (1, HIGH, HIGH, 3)).astype(np.float32),
          "image_mask": np.ones(1, np.float32), "image_positions": np.array([1], np.int32),
          "tokens": tokens, "targets": np.roll(tokens, -1) * mask.astype(np.int32),
          "loss_mask": mask * (np.arange(LENGTH) > SLOTS), "token_mask": mask,
          "loss_weight": np.float32(weight), health.SKIPPED_KEY: np.int32(0),
          health.TASK_KEY: np.int32(0)}


# 13 + 10 tokens share row 0 (first fit of 24), 15 go to row 1
EXAMPLES = [_example(0, 13, 1.0), _example(1, 10, 0.5), _example(2, 15, 2.0)]


def _packed_rows(examples):
  return packing_checks.packed_rows(examples, data_lib.PACKING, dict(
      sequence_length=LENGTH, packed_images=2, packing_bins=2))


@pytest.fixture(scope="module")
def tiny():
  model = builders.build("cogagent", **TINY)
  unpacked = packing_checks.stack(EXAMPLES)
  return model, packing_checks.init_params(model, unpacked), unpacked, _packed_rows(EXAMPLES)


def test_rows_carry_both_views_of_each_image_and_route_the_same_tokens(tiny):
  model, params, unpacked, packed = tiny
  np.testing.assert_array_equal(packed["segment_ids"][0], [1] * 13 + [2] * 10 + [0])
  np.testing.assert_array_equal(packed["image_positions"], [[1, 14], [1, 0]])
  np.testing.assert_array_equal(packed["image_mask"], [[1, 1], [1, 0]])
  for key in ("images", "high_res_images"):
    np.testing.assert_array_equal(packed[key][0, 1], EXAMPLES[1][key][0])
  embed = jax.jit(lambda b: model.apply({"params": params}, b, method=model.embed_inputs)[2])
  vision, vision_packed = embed(unpacked)["is_vision"], embed(packed)["is_vision"]
  np.testing.assert_array_equal(vision_packed[0], np.concatenate([vision[0, :13],
                                                                  vision[1, :10], [False]]))
  assert vision_packed[0].sum() == 2 * SLOTS


def test_packed_loss_equals_the_unpacked_examples_loss(tiny):
  model, params, unpacked, packed = tiny
  def loss(batch):
    return step_lib.token_cross_entropy(model.apply({"params": params}, batch), batch)
  (num, den), (num_p, den_p) = jax.jit(loss)(unpacked), jax.jit(loss)(packed)
  assert float(den) == float(den_p) > 0
  np.testing.assert_allclose(num_p, num, rtol=1e-5)


def test_no_attention_across_segments_nor_to_their_high_res_images(tiny):
  """Gradients of one segment's loss w.r.t. the other's input embeddings (text and spliced
  low-res visual tokens) and w.r.t. its high-res pixels are exactly zero (and not w.r.t. its
  own); changing the other's low-res image (behind the frozen ViT's stop-gradient) changes
  no logit of this one."""
  model, params, _, packed = tiny
  row = jax.tree.map(lambda a: a[:1], packed)
  segments = row["segment_ids"][0]
  x, token_mask, _ = jax.jit(lambda b: model.apply({"params": params}, b,
                                                   method=model.embed_inputs))(row)

  def segment_loss(x, high_res_images, segment):
    def forward(module):
      *_, extra = module.embed_inputs(dict(row, high_res_images=high_res_images))
      hidden = module.lm.trunk(x, token_mask=token_mask, extra=extra,
                               **segment_mask.packed_context(row))
      return module.lm.logits(hidden)
    logits = model.apply({"params": params}, method=forward)
    ce = -jax.nn.log_softmax(logits)[0, jnp.arange(LENGTH), row["targets"][0]]
    return jnp.sum(ce * (segments == segment))

  grad_fn = jax.jit(jax.grad(segment_loss, argnums=(0, 1)))
  for mine, other in ((1, 2), (2, 1)):
    grad_x, grad_high = (np.asarray(g[0]) for g in grad_fn(x, row["high_res_images"], mine))
    assert np.all(grad_x[segments == other] == 0) and np.any(grad_x[segments == mine] != 0)
    assert np.all(grad_high[other - 1] == 0) and np.any(grad_high[mine - 1] != 0)
  images = row["images"].copy()
  images[0, 1] = 0.3
  apply = jax.jit(lambda batch: model.apply({"params": params}, batch))
  logits, logits_changed = apply(row), apply(dict(row, images=images))
  np.testing.assert_array_equal(logits[0, segments == 1], logits_changed[0, segments == 1])
  assert not np.array_equal(logits[0, segments == 2], logits_changed[0, segments == 2])


def test_packed_pipeline_resumes_exactly_and_fills_rows():
  """On the sample data (the default data dir, generated once for every test)."""
  data = config_lib.load_config_file("configs/cogagent.py:tiny,packed=True").data
  data.packing_bins = 16
  _, batches = packing_checks.resumed_packed_batches(data, "cogagent", 1, after=2)
  assert packing.efficiency(batches) > 0.85
  spec = model_lib.batch_spec(data, 1)
  assert {k: (v.shape, v.dtype) for k, v in spec.items()} == {
      k: (v.shape, v.dtype) for k, v in batches[0].items()}


def test_flops_count_every_image_slot_of_a_packed_row():
  unpacked = config_lib.load_config("configs/cogagent.py:tiny")
  packed = config_lib.load_config("configs/cogagent.py:tiny,packed=True")
  one, row = model_lib.flops_parts(unpacked), model_lib.flops_parts(packed)
  for part in ("vision", "adapter", "high_res"):
    assert row[part] == packed.data.packed_images * one[part], part
  assert row["lm"] > 4 * one["lm"]  # rows of 4T; attention grows faster than T
