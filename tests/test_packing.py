"""Sequence packing (data/packing.py) through MiniGPT-v2, the family that declares PACKING:
rows built by the real packer from examples in the processor's layout; no attention across
segments (one segment's loss does not depend on another's input embeddings or images); the
packed loss equals the unpacked examples' summed loss; and the pipeline's packed stream
resumes exactly from a saved iterator state."""
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import builders
import packing_checks
from vlm_jax import config as config_lib
from vlm_jax.data import health, packing
from vlm_jax.data.families import minigpt_v2 as data_lib
from vlm_jax.data.synthetic import sample_data
from vlm_jax.nn import segment_mask
from vlm_jax.train import step as step_lib

VOCAB, IMAGE, LENGTH, SLOT = 64, 56, 24, 4  # 56 px / 14 px patches / group 4 -> 4 LM tokens
TINY = dict(lm=dict(vocab_size=VOCAB, width=32, num_layers=2, num_heads=4, mlp_dim=48),
            vision=dict(width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=14,
                        class_token=True), group_size=4)


def _example(seed, valid, image_at, weight, task):
  """One processed example as the MiniGPT-v2 processor lays it out (padded to LENGTH)."""
  rng = np.random.default_rng(seed)
  mask = (np.arange(LENGTH) < valid).astype(np.float32)
  tokens = (rng.integers(6, VOCAB, LENGTH) * mask).astype(np.int32)
  return {"images": rng.uniform(-1, 1, (1, IMAGE, IMAGE, 3)).astype(np.float32),
          "image_mask": np.ones(1, np.float32), "image_positions": np.array([image_at], np.int32),
          "tokens": tokens, "targets": np.roll(tokens, -1) * mask.astype(np.int32),
          "loss_mask": mask * (np.arange(LENGTH) > image_at + SLOT), "token_mask": mask,
          "loss_weight": np.float32(weight), health.SKIPPED_KEY: np.int32(0),
          health.TASK_KEY: np.int32(task)}


EXAMPLES = [_example(0, 11, 1, 1.0, task=0), _example(1, 9, 2, 0.5, task=1),
            _example(2, 13, 1, 2.0, task=0)]
COUNTERS = packing_checks.COUNTERS


def _pack(examples, images=2) -> grain.IterDataset:
  config = ml_collections.ConfigDict(dict(sequence_length=LENGTH, packed_images=images,
                                          packing_bins=2))
  return packing.pack(grain.MapDataset.source(examples).to_iter_dataset(), packing.Layout(),
                      config, seed=0)


def _packed_rows(examples, images=2):
  return packing_checks.stack(_pack(examples, images))


@pytest.fixture(scope="module")
def tiny():
  model = builders.build("minigpt_v2", **TINY)
  unpacked = packing_checks.stack(EXAMPLES)
  return model, packing_checks.init_params(model, unpacked), unpacked, _packed_rows(EXAMPLES)


def test_rows_hold_each_example_with_its_image_at_its_own_slots(tiny):
  *_, packed = tiny
  # 11 + 9 tokens share row 0 (first fit of 24), 13 go to row 1
  np.testing.assert_array_equal(packed["segment_ids"][0], [1] * 11 + [2] * 9 + [0] * 4)
  np.testing.assert_array_equal(packed["positions"][0, 9:13], [9, 10, 0, 1])
  np.testing.assert_array_equal(packed["image_positions"], [[1, 13], [1, 0]])
  np.testing.assert_array_equal(packed["image_mask"], [[1, 1], [1, 0]])
  np.testing.assert_array_equal(packed["tokens"][0, 11:20], EXAMPLES[1]["tokens"][:9])
  np.testing.assert_array_equal(packed["images"][0, 1], EXAMPLES[1]["images"][0])
  np.testing.assert_array_equal(packed["loss_weight"][0, :12], [1.0] * 11 + [0.5])


def test_counters_count_examples_tasks_and_skipped_records_not_rows():
  examples = [dict(e) for e in EXAMPLES]
  examples[1][health.SKIPPED_KEY] = np.int32(3)
  counted = iter(health.CountSkipped(_pack(examples).batch(2), ["a", "b"]))
  batch = next(counted)
  assert len(batch["tokens"]) == 2 and not set(COUNTERS) & set(batch)
  assert counted.counters == {"examples": 3, "skipped_records": 3, "examples/a": 2,
                              "examples/b": 1}


def test_packed_loss_equals_the_unpacked_examples_loss(tiny):
  model, params, unpacked, packed = tiny
  def loss(batch):
    return step_lib.token_cross_entropy(model.apply({"params": params}, batch), batch)
  (num, den), (num_p, den_p) = jax.jit(loss)(unpacked), jax.jit(loss)(packed)
  assert float(den) == float(den_p) > 0
  np.testing.assert_allclose(num_p, num, rtol=1e-5)


def test_no_attention_across_segments(tiny):
  """Gradients of segment 1's loss w.r.t. segment 2's input embeddings (text and spliced
  visual tokens) are exactly zero, and changing segment 2's image changes no logit of
  segment 1 (the ViT is frozen behind a stop-gradient, so its pixel gradient is zero anyway)."""
  model, params, _, packed = tiny
  row = jax.tree.map(lambda a: a[:1], packed)
  segments = row["segment_ids"][0]
  x, token_mask, _ = model.apply({"params": params}, row, method=model.embed_inputs)

  def segment_loss(x, segment):
    def forward(module, x):
      hidden = module.lm.trunk(x, token_mask=token_mask, **segment_mask.packed_context(row))
      return module.lm.logits(hidden)
    logits = model.apply({"params": params}, x, method=forward)
    ce = -jax.nn.log_softmax(logits)[0, jnp.arange(LENGTH), row["targets"][0]]
    return jnp.sum(ce * (segments == segment))

  grad_fn = jax.jit(jax.grad(segment_loss), static_argnums=1)
  for mine, other in ((1, 2), (2, 1)):
    grad = grad_fn(x, mine)[0]
    assert np.all(np.asarray(grad[segments == other]) == 0)
    assert np.any(np.asarray(grad[segments == mine]) != 0)
  images = row["images"].copy()
  images[0, 1] = 0.3
  apply = jax.jit(lambda batch: model.apply({"params": params}, batch))
  logits, logits_changed = apply(row), apply(dict(row, images=images))
  np.testing.assert_array_equal(logits[0, segments == 1], logits_changed[0, segments == 1])
  assert not np.array_equal(logits[0, segments == 2], logits_changed[0, segments == 2])


def test_packed_pipeline_resumes_exactly_and_fills_rows(tmp_path):
  root = str(tmp_path / "data")
  sample_data.ensure_sample_data(root, sample_data.SyntheticSizes(
      train_pairs=200, validation_pairs=8, train_docs=8, validation_docs=4,
      train_interleaved=4, validation_interleaved=2, shard_size=100, image_size=32))
  data = config_lib.load_config_file("configs/minigpt_v2.py:tiny").data
  data.data_dir, data.packing, data.packing_bins = root, True, 32
  it, batches = packing_checks.resumed_packed_batches(data, "minigpt_v2", 4)
  assert packing.efficiency(batches) > 0.8
  # the counters count examples (one per segment) and their tasks
  per_task = [v for k, v in it.counters.items() if k.startswith("examples/")]
  assert it.counters["examples"] == sum(int(b["segment_ids"].max(1).sum())
                                        for b in batches) == sum(per_task) > 5 * 4
  assert np.count_nonzero(per_task) >= 2, it.counters
  assert set(batches[0]) == set(data_lib.PACKING.text_keys + data_lib.PACKING.image_keys) | {
      "image_positions", "loss_weight", "segment_ids", "positions"}
