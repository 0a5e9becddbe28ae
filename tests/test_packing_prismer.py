"""Sequence packing (data/packing.py) through Prismer: the decoder texts of several examples
share a row, each example's image and expert maps travel into its own slot; no attention
across segments, neither the decoder's self-attention nor its cross-attention to the
encoded slots (one segment's loss has exactly zero gradient w.r.t. another's decoder input
embeddings, image and expert maps); the packed loss equals the unpacked examples' summed
loss; and the pipeline's packed stream resumes exactly from a saved iterator state."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import packing_checks
from vlm_jax import config as config_lib
from vlm_jax.data import health, packing
from vlm_jax.data.families import prismer as data_lib
from vlm_jax.data.vocab import Vocab
from vlm_jax.models import prismer as model_lib
from vlm_jax.models import registry
from vlm_jax.train import step as step_lib

TEXT, SIZE = 12, 32


def _config():
  """Tiny, one layer each, one expert (the pipeline test packs all of tiny's)."""
  config = config_lib.load_config("configs/prismer.py:tiny,experts=depth")
  config.model.vision.image_size = config.data.image_size = config.data.expert_size = SIZE
  config.model.vision.depth = config.model.vision.resampler_layers = config.model.lm.num_layers = 1
  config.data.text_length = TEXT
  config.data.sequence_length, config.data.packed_images, config.data.packing_bins = TEXT, 2, 2
  return config


def _example(seed, caption_length, weight):
  """One processed example as the Prismer processor lays it out (unpacked)."""
  rng = np.random.default_rng(seed)
  example = data_lib.caption_arrays(rng.integers(6, 64, caption_length).tolist(), TEXT,
                                    Vocab())
  example.update(images=rng.uniform(-1, 1, (1, SIZE, SIZE, 3)).astype(np.float32),
                 expert_depth=rng.uniform(-1, 1, (SIZE, SIZE, 1)).astype(np.float32),
                 loss_weight=np.float32(weight))
  return example


# 6 + 5 decoder inputs share row 0 (first fit of 12), 9 go to row 1
EXAMPLES = [_example(0, 5, 1.0), _example(1, 4, 0.5), _example(2, 8, 2.0)]


@pytest.fixture(scope="module")
def tiny():
  config = _config()
  counters = {health.SKIPPED_KEY: np.int32(0), health.TASK_KEY: np.int32(0)}
  packable = [dict(data_lib.packable(e, config.data.experts), **counters) for e in EXAMPLES]
  packed = packing_checks.packed_rows(packable, data_lib.PACKING(config.data), config.data)
  unpacked = packing_checks.stack(EXAMPLES)
  model = registry.build(config.model)
  return model, packing_checks.init_params(model, unpacked), unpacked, packed


def test_rows_hold_each_example_with_its_image_and_maps_in_its_slot(tiny):
  *_, packed = tiny
  np.testing.assert_array_equal(packed["segment_ids"][0], [1] * 6 + [2] * 5 + [0])
  np.testing.assert_array_equal(packed["positions"][0, 5:8], [5, 0, 1])
  np.testing.assert_array_equal(packed["image_positions"], [[0, 6], [0, 0]])
  np.testing.assert_array_equal(packed["image_mask"], [[1, 1], [1, 0]])
  for key in data_lib.image_keys(("depth",)):
    np.testing.assert_array_equal(packed[key][0, 1], np.reshape(EXAMPLES[1][key],
                                                                packed[key].shape[2:]))


def test_packed_loss_equals_the_unpacked_examples_loss(tiny):
  model, params, unpacked, packed = tiny
  def loss(batch):
    return step_lib.token_cross_entropy(model.apply({"params": params}, batch), batch)
  (num, den), (num_p, den_p) = jax.jit(loss)(unpacked), jax.jit(loss)(packed)
  assert float(den) == float(den_p) > 0
  np.testing.assert_allclose(num_p, num, rtol=1e-5)


def test_no_attention_across_segments_nor_to_their_images(tiny):
  """Gradients of one segment's loss w.r.t. the other's decoder input embeddings, image and
  expert maps are exactly zero (and not w.r.t. its own)."""
  model, params, _, packed = tiny
  row = jax.tree.map(lambda a: a[:1], packed)
  segments = row["segment_ids"][0]
  x = model.apply({"params": params}, row["tokens"], row["positions"], method=model.embed_text)
  pixels = {k: row[k] for k in ("images", "expert_depth")}

  def segment_loss(x, pixels, segment):
    def forward(module):
      batch = dict(row, **pixels)
      context = module.packed_context(batch, module.encode_images(batch))
      return module.decoder_logits(x, context)
    logits = model.apply({"params": params}, method=forward)
    ce = -jax.nn.log_softmax(logits)[0, jnp.arange(len(segments)), row["targets"][0]]
    return jnp.sum(ce * (segments == segment))

  grad_fn = jax.jit(jax.grad(segment_loss, argnums=(0, 1)))
  for mine, other in ((1, 2), (2, 1)):
    grad_x, grad_pixels = grad_fn(x, pixels, mine)
    grad_x = np.asarray(grad_x[0])
    assert np.all(grad_x[segments == other] == 0) and np.any(grad_x[segments == mine] != 0)
    for key, grad in grad_pixels.items():
      grad = np.asarray(grad[0])
      assert np.all(grad[other - 1] == 0) and np.any(grad[mine - 1] != 0), key


def test_packed_pipeline_resumes_exactly_and_fills_rows():
  """On the sample data (the default data dir, generated once for every test)."""
  data = config_lib.load_config_file("configs/prismer.py:tiny,packed=True").data
  data.packing_bins = 16
  _, batches = packing_checks.resumed_packed_batches(data, "prismer", 2, after=2)
  assert packing.efficiency(batches, "loss_mask") > 0.8
  spec = model_lib.batch_spec(data, 2)
  assert {k: (v.shape, v.dtype) for k, v in spec.items()} == {
      k: (v.shape, v.dtype) for k, v in batches[0].items()}


def test_flops_count_every_image_slot_of_a_packed_row():
  unpacked = config_lib.load_config("configs/prismer.py:tiny")
  packed = config_lib.load_config("configs/prismer.py:tiny,packed=True")
  one, row = model_lib.flops_parts(unpacked), model_lib.flops_parts(packed)
  for part in ("vision_stems", "vision_layers", "vision_adaptors"):
    assert row[part] == packed.data.packed_images * one[part], part
