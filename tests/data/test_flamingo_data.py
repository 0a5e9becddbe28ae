"""Flamingo converter and mixture: token layout, loss mask, media positions, truncation,
video frames, interleaved sources, realised rates and loss weights."""
import collections
import io

import numpy as np
import pytest
from PIL import Image

from vlm_jax.data import catalog, health, pipeline, preprocessors
from vlm_jax.data.families import flamingo as data_lib
from vlm_jax.data.sources import interleaved
from vlm_jax.data.vocab import BOS_ID, EOS_ID, PAD_ID, Vocab

IMAGE_ID, CHUNK_ID = 4, 5


@pytest.fixture(scope="module")
def vocab():
  return Vocab()


def _png(value, size=8):
  buf = io.BytesIO()
  Image.new("RGB", (size, size), (value, value, value)).save(buf, format="PNG")
  return buf.getvalue()


def _flamingo_config(data_config, **fields):
  cfg = data_config
  cfg.mixture = "pretrain_flamingo"
  cfg.sequence_length, cfg.max_images, cfg.frames_per_media = 64, 3, 0
  for key, value in fields.items():
    cfg[key] = value
  return cfg


def test_document_layout_loss_mask_and_positions(vocab):
  a, b, c = vocab.encode("a dog."), vocab.encode("the red circle."), vocab.encode("more text.")
  items = [("text", "a dog."), ("image", b"A"), ("text", "the red circle."),
           ("image", b"B"), ("text", "more text.")]
  example, media = data_lib.encode_document(vocab, items, sequence_length=40, max_images=3,
                                            loss_weight=0.5)
  ids = [BOS_ID] + a + [IMAGE_ID] + b + [CHUNK_ID, IMAGE_ID] + c + [CHUNK_ID, EOS_ID]
  n = len(ids) - 1
  np.testing.assert_array_equal(example["tokens"][:n], ids[:-1])
  np.testing.assert_array_equal(example["targets"][:n], ids[1:])
  assert (example["tokens"][n:] == PAD_ID).all() and (example["token_mask"][:n] == 1).all()
  assert (example["token_mask"][n:] == 0).all()
  first, second = 1 + len(a), 1 + len(a) + 1 + len(b) + 1
  np.testing.assert_array_equal(example["image_positions"], [first, second, 0])
  np.testing.assert_array_equal(example["image_mask"], [1, 1, 0])
  assert media == [b"A", b"B"]
  # Loss on targets inside chunks: b + its <|endofchunk|>, c + its <|endofchunk|>; not on
  # text before the first image, <image> tokens, or EOS.
  labelled = [int(t) for t, m in zip(example["targets"], example["loss_mask"]) if m]
  assert labelled == b + [CHUNK_ID] + c + [CHUNK_ID]
  assert example["loss_weight"] == np.float32(0.5)


def test_text_between_a_chunk_end_and_the_next_image_has_no_loss(vocab):
  items = [("image", b"A"), ("text", "one."), ("text", "two."), ("image", b"B"),
           ("text", "three.")]
  example, _ = data_lib.encode_document(vocab, items, sequence_length=40, max_images=2)
  labelled = [int(t) for t, m in zip(example["targets"], example["loss_mask"]) if m]
  # "one." and "two." belong to image A's chunk (it ends at the next image).
  assert labelled == (vocab.encode("one.") + vocab.encode("two.") + [CHUNK_ID]
                      + vocab.encode("three.") + [CHUNK_ID])


def test_pairs_are_one_image_documents(vocab):
  raw = {"image": b"X", "text": "a red circle", "meta": None}
  items = data_lib.document_items(raw)
  assert items == [("image", b"X"), ("text", "a red circle")]
  example, media = data_lib.encode_document(vocab, items, sequence_length=16, max_images=2)
  caption = vocab.encode("a red circle")
  np.testing.assert_array_equal(example["tokens"][:len(caption) + 3],
                                [BOS_ID, IMAGE_ID] + caption + [CHUNK_ID])
  assert media == [b"X"] and example["image_positions"][0] == 1


def test_truncation_keeps_max_images_and_drops_images_that_do_not_fit(vocab):
  items = [("image", b"A"), ("text", "one."), ("image", b"B"), ("text", "two."),
           ("image", b"C"), ("text", "three.")]
  example, media = data_lib.encode_document(vocab, items, sequence_length=64, max_images=2)
  assert media == [b"A", b"B"]
  assert (example["tokens"] == IMAGE_ID).sum() == 2
  expected = ([BOS_ID, IMAGE_ID] + vocab.encode("one.") + [CHUNK_ID, IMAGE_ID]
              + vocab.encode("two.") + [CHUNK_ID])  # the document stops before image C
  np.testing.assert_array_equal(example["tokens"][example["token_mask"] > 0], expected)
  # A sequence that ends before image B's <image> token: B is dropped, not left dangling.
  short = 1 + 1 + len(vocab.encode("one.")) + 1  # BOS <image> one. <|endofchunk|>
  example, media = data_lib.encode_document(vocab, items, sequence_length=short, max_images=3)
  assert media == [b"A"] and example["image_mask"].tolist() == [1, 0, 0]
  assert (example["tokens"] == IMAGE_ID).sum() == 1
  with pytest.raises(preprocessors.BadRecord, match="no image"):
    data_lib.encode_document(vocab, [("text", "no images here.")], sequence_length=16,
                             max_images=2)


def test_video_frames_are_sampled_and_images_repeated():
  clip = [_png(v) for v in (0, 50, 100, 150, 200, 250)]
  assert data_lib.sample_frames(clip, 3) == [clip[0], clip[2], clip[5]]  # evenly spaced
  assert data_lib.sample_frames(clip[:2], 4) == [clip[0], clip[1], clip[1], clip[1]]
  frames = data_lib.media_pixels(clip, image_size=8, frames_per_media=3)
  assert frames.shape == (3, 8, 8, 3)
  np.testing.assert_allclose(frames[:, 0, 0, 0], np.array([0, 100, 250]) / 127.5 - 1, atol=0.02)
  still = data_lib.media_pixels(_png(30), image_size=8, frames_per_media=2)
  np.testing.assert_array_equal(still[0], still[1])
  with pytest.raises(preprocessors.BadRecord, match="frames_per_media"):
    data_lib.media_pixels(clip, image_size=8, frames_per_media=0)


def test_interleaved_sources_read_by_index_and_reuse_their_copy(data_dir):
  spec = catalog.tasks(data_lib)["flamingo_mmc4"]
  source = catalog.make_source(spec, data_dir, "validation")
  assert isinstance(source, interleaved.Mmc4Source) and len(source) > 0
  record = source[len(source) - 1]
  assert record["kind"] == "interleaved" and len(record["texts"]) == len(record["images"])
  assert all((t is None) != (i is None) for t, i in zip(record["texts"], record["images"]))
  again = catalog.make_source(spec, data_dir, "validation")
  assert again.paths == source.paths  # the first copy is reused
  obelics = catalog.make_source(catalog.tasks(data_lib)["flamingo_obelics"], data_dir,
                               "validation")
  assert len(obelics) > 0 and obelics[0]["kind"] == "interleaved"


def test_mixture_rates_loss_weights_and_media_positions(data_config):
  cfg = _flamingo_config(data_config)
  rates = dict(data_lib.MIXTURES["pretrain_flamingo"])
  records = pipeline.mixed_records(cfg, "flamingo", seed=0)
  counts = collections.Counter(records[i][0].name for i in range(400))
  for name, rate in rates.items():
    assert counts[name] / 400 == pytest.approx(rate / sum(rates.values()), abs=0.03), counts
  processor = data_lib.Processor(cfg, seed=0)
  weights = {"flamingo_mmc4": 1.0, "flamingo_obelics": 1.0, "flamingo_pairs": 0.2}
  seen = collections.Counter()
  for i in range(60):
    spec, raw = records[i]
    example = processor(i, (spec, raw))
    if isinstance(example, health.Skipped):
      continue
    seen[spec.name] += 1
    assert example["loss_weight"] == np.float32(weights[spec.name])
    present = example["image_mask"] > 0
    positions = example["image_positions"][present]
    # Every present item's <image> token is where its position says, in order, and no
    # other <image> token exists.
    assert (example["tokens"][positions] == IMAGE_ID).all()
    assert (np.diff(positions) > 0).all()
    assert (example["tokens"] == IMAGE_ID).sum() == present.sum() >= 1
    assert example["images"].shape == (3, 32, 32, 3)
    assert (example["images"][~present] == 0).all()
    assert np.abs(example["images"][present]).max() > 0
    if spec.kind == "pairs":
      assert present.sum() == 1
  assert set(seen) == set(weights)


def test_the_grain_pipeline_batches_flamingo_examples(data_config):
  cfg = _flamingo_config(data_config)
  batch = next(pipeline.make_train_iterator(cfg, "flamingo", global_batch_size=4, seed=0,
                                            process_index=0, process_count=1))
  assert batch["images"].shape == (4, 3, 32, 32, 3)
  assert batch["tokens"].shape == batch["loss_mask"].shape == (4, 64)
  assert set(np.unique(batch["loss_weight"])) <= {np.float32(1.0), np.float32(0.2)}
