"""Sequence packing (data/packing.py) for Flamingo: interleaved documents and pairs, several
images each, share rows and their image slots. Rows built by the real packer from documents
the real encoder lays out; no attention across documents (one document's loss does not
depend on another's input embeddings or visual tokens, and an image is visible only inside
its own document); the packed loss equals the unpacked documents' summed loss; and the
pipeline's packed stream of the pretraining mixture resumes exactly."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import builders
import packing_checks
from test_flamingo import TINY, _set_gates
from vlm_jax import config as config_lib
from vlm_jax.data import health, packing
from vlm_jax.data.families import flamingo as data_lib
from vlm_jax.data.synthetic import sample_data
from vlm_jax.data.vocab import Vocab
from vlm_jax.models import flamingo as model_lib
from vlm_jax.models import registry
from vlm_jax.nn import gated_xattn, segment_mask
from vlm_jax.train import step as step_lib

LENGTH, MEDIA, SLOTS, IMAGE = 24, 3, 4, 16  # tokens, images per document / per row, px
DOCUMENTS = (  # (items, loss weight): a pair, text before the first image, three images
    ([("image", 0), ("text", "a red square")], 0.2),
    ([("text", "my cat"), ("image", 1), ("text", "sits on a mat"), ("image", 2),
      ("text", "and sleeps")], 1.0),
    ([("image", 3), ("text", "blue circle"), ("image", 4), ("text", "green"), ("image", 5),
      ("text", "three")], 1.0),
)


def _example(vocab, items, weight):
  """One processed example as the Flamingo processor lays it out; image k is random pixels."""
  example, media = data_lib.encode_document(vocab, items, sequence_length=LENGTH,
                                            max_images=MEDIA, loss_weight=weight)
  example["images"] = np.zeros((MEDIA, IMAGE, IMAGE, 3), np.float32)
  for n, seed in enumerate(media):
    example["images"][n] = np.random.default_rng(seed).uniform(-1, 1, (IMAGE, IMAGE, 3))
  return dict(example, **{health.SKIPPED_KEY: np.int32(0), health.TASK_KEY: np.int32(0)})


def _packed_rows(examples):
  return packing_checks.packed_rows(examples, data_lib.PACKING, dict(
      sequence_length=LENGTH, packed_images=SLOTS, packing_bins=2))


@pytest.fixture(scope="module")
def tiny():
  vocab = Vocab()
  # one layer group: a gated block, then two LM layers
  model = builders.build("flamingo", **dict(TINY, lm=dict(TINY["lm"], vocab_size=1024,
                                                           num_layers=2)))
  examples = [_example(vocab, items, weight) for items, weight in DOCUMENTS]
  unpacked = packing_checks.stack(examples)
  params = packing_checks.init_params(model, unpacked)
  # open gates, so that the media reach the LM (at 0 the blocks are the identity)
  params = _set_gates(params, 0.7)
  apply = jax.jit(lambda batch: model.apply({"params": params}, batch))  # one per shape
  return model, params, apply, unpacked, _packed_rows(examples)


def test_documents_share_rows_with_their_images_in_the_row_slots(tiny):
  *_, unpacked, packed = tiny
  # the pair (6 tokens, 1 image) and the 2-image document (14) share row 0; the 3-image
  # document (11 tokens) would fit there by tokens but not by image slots (3 + 3 > 4)
  np.testing.assert_array_equal(packed["segment_ids"][:, :20],
                                [[1] * 6 + [2] * 14, [1] * 11 + [0] * 9])
  np.testing.assert_array_equal(packed["image_mask"], [[1, 1, 1, 0], [1, 1, 1, 0]])
  np.testing.assert_array_equal(packed["image_positions"], [[1, 9, 16, 0], [1, 5, 8, 0]])
  np.testing.assert_array_equal(packed["tokens"][0, packed["image_positions"][0, :3]], [4] * 3)
  np.testing.assert_array_equal(packed["images"][0, 1:3], unpacked["images"][1, :2])
  np.testing.assert_array_equal(packed["images"][1, :3], unpacked["images"][2])
  np.testing.assert_array_equal(packed["positions"][0, 4:8], [4, 5, 0, 1])


def test_a_text_only_document_takes_no_image_slot():
  vocab = Vocab()
  text, _ = data_lib.encode_document(vocab, [("text", "just some words here")],
                                     sequence_length=LENGTH, max_images=MEDIA, text_only=True)
  text["images"] = np.zeros((MEDIA, IMAGE, IMAGE, 3), np.float32)
  text.update({health.SKIPPED_KEY: np.int32(0), health.TASK_KEY: np.int32(0)})
  packed = _packed_rows([text, _example(vocab, *DOCUMENTS[0])])  # 9 tokens, then the pair
  np.testing.assert_array_equal(packed["segment_ids"][0, :16], [1] * 9 + [2] * 6 + [0])
  np.testing.assert_array_equal(packed["image_mask"], [[1, 0, 0, 0]])
  np.testing.assert_array_equal(packed["image_positions"], [[10, 0, 0, 0]])


@pytest.mark.parametrize("immediate", [True, False])
def test_an_image_is_visible_only_inside_its_own_document(immediate):
  # one row: document 1 (tokens 0-3, image at 1), document 2 (tokens 4-9, images at 6, 8)
  segments = jnp.array([[1] * 4 + [2] * 6])
  visible = gated_xattn.media_visibility(jnp.array([[1, 6, 8]]), jnp.ones((1, 3)), 10,
                                         immediate, segments)[0]
  want = np.zeros((10, 3), bool)
  want[1:4, 0] = True  # document 2's text before its first image sees nothing
  want[6:8, 1] = True
  want[8:, 2] = True
  if not immediate:
    want[8:, 1] = True
  np.testing.assert_array_equal(visible, want)


def test_packed_loss_equals_the_unpacked_documents_loss(tiny):
  _, _, apply, unpacked, packed = tiny
  loss = lambda batch: step_lib.token_cross_entropy(apply(batch), batch)
  (num, den), (num_p, den_p) = loss(unpacked), loss(packed)
  assert float(den) == float(den_p) > 0
  np.testing.assert_allclose(num_p, num, rtol=1e-5)


def test_no_attention_across_documents(tiny):
  """Gradients of one document's token losses w.r.t. the other document's input embeddings
  and visual tokens (the resampler's output for each image slot) are exactly zero, and new
  pixels for one document's image change no logit of the other (the ViT is frozen behind a
  stop-gradient, so its pixel gradient is zero anyway)."""
  model, params, apply, _, packed = tiny
  row = jax.tree.map(lambda a: a[:1], packed)
  segments = row["segment_ids"][0]
  slot_segments = np.where(row["image_mask"][0] > 0, segments[row["image_positions"][0]], 0)
  x, token_mask, extra = model.apply({"params": params}, row, method=model.embed_inputs)
  media = extra["media"].reshape(1, SLOTS, -1, extra["media"].shape[-1])

  def segment_loss(x, media, segment):
    def forward(module, x, media):
      flat = media.reshape(1, -1, media.shape[-1])
      hidden = module.lm.trunk(x, token_mask=token_mask, extra=dict(extra, media=flat),
                               **segment_mask.packed_context(row))
      return module.lm.logits(hidden)
    logits = model.apply({"params": params}, x, media, method=forward)
    ce = -jax.nn.log_softmax(logits)[0, jnp.arange(LENGTH), row["targets"][0]]
    return jnp.sum(ce * (segments == segment))

  grad_fn = jax.jit(jax.grad(segment_loss, argnums=(0, 1)))
  for mine, other in ((1, 2), (2, 1)):
    grad_x, grad_media = (np.asarray(g[0]) for g in grad_fn(x, media, jnp.int32(mine)))
    assert np.all(grad_x[segments == other] == 0)
    assert np.all(grad_media[slot_segments == other] == 0)
    assert np.any(grad_x[segments == mine] != 0)
    assert all(np.any(grad_media[n] != 0) for n in np.flatnonzero(slot_segments == mine))
  for mine, other in ((1, 2), (2, 1)):
    images = packed["images"].copy()  # both rows: the loss test compiled that shape
    images[0, slot_segments == other] = 0.3
    logits, changed = apply(packed)[0], apply(dict(packed, images=images))[0]
    np.testing.assert_array_equal(logits[segments == mine], changed[segments == mine])
    assert not np.array_equal(logits[segments == other], changed[segments == other])


def test_packed_config_counts_every_image_slot():
  plain = config_lib.load_config("configs/flamingo.py:bench")
  packed = config_lib.load_config("configs/flamingo.py:bench,packed=True")
  assert packed.data.packing and packed.data.packed_images == 12
  assert registry.batch_spec(packed, 2)["images"].shape == (2, 12, 112, 112, 3)
  parts, packed_parts = model_lib.flops_parts(plain), model_lib.flops_parts(packed)
  for part in ("vision", "resampler"):
    assert packed_parts[part] == pytest.approx(6 * parts[part])  # 12 slots vs max_images 2
  assert packed_parts["lm"] == parts["lm"]


def test_packed_pretraining_stream_resumes_exactly_with_each_image_in_its_document(tmp_path):
  root = str(tmp_path / "data")
  sample_data.ensure_sample_data(root, sample_data.SyntheticSizes(
      train_pairs=100, validation_pairs=8, train_docs=4, validation_docs=4,
      train_interleaved=40, validation_interleaved=2, shard_size=100, image_size=32))
  data = config_lib.load_config_file("configs/flamingo.py:tiny,packed=True").data
  data.data_dir = root
  _, batches = packing_checks.resumed_packed_batches(data, "flamingo", 4)
  assert packing.efficiency(batches) > 0.8
  rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  image_id = Vocab().token_id(data_lib.IMAGE_TOKEN)
  for tokens, segments, positions, present in zip(
      rows["tokens"], rows["segment_ids"], rows["image_positions"], rows["image_mask"]):
    # every <image> token of the row has its slot, in order, and each slot its <image>
    np.testing.assert_array_equal(positions[present > 0], np.flatnonzero(tokens == image_id))
    assert np.all(present[:int(present.sum())] == 1)
  assert rows["segment_ids"].max(1).mean() > 2  # several documents per row
