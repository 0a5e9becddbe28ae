"""The real photographs (scikit-image's bundled data) as an img2dataset task."""
import json
import os

import numpy as np

from vlm_jax.data import catalog, pipeline
from vlm_jax.data.sources import webdataset
from vlm_jax.data.synthetic import photos
from vlm_jax.data.vocab import Vocab


def test_photos_are_img2dataset_shards_with_their_captions(data_dir):
  root = photos.ensure_photos(data_dir)
  assert photos.ensure_photos(data_dir) == root  # idempotent
  train = webdataset.WebDatasetSource([os.path.join(root, "train", "00000.tar")])
  validation = webdataset.WebDatasetSource([os.path.join(root, "validation", "00000.tar")])
  assert len(validation) == len(photos.CAPTIONS) and len(train) == 16 * len(photos.CAPTIONS)
  record = validation[0]
  meta = json.loads(record["meta"])
  assert meta["url"] == "skimage://data/astronaut"
  assert record["text"] == photos.CAPTIONS["astronaut"] == meta["caption"]
  with open(os.path.join(root, "validation", "00000_stats.json")) as f:
    assert json.load(f)["successes"] == len(photos.CAPTIONS)


def test_photos_task_trains_through_the_pipeline(data_config):
  data_config.mixture = "photos"
  it = pipeline.make_train_iterator(data_config, "simvlm", global_batch_size=8, seed=0,
                                    process_index=0, process_count=1)
  batch = next(it)
  assert batch["images"].shape == (8, 1, 32, 32, 3) and batch["image_mask"].all()
  texts = [Vocab().decode(np.concatenate([p[m > 0], t[l > 0]]))
           for p, m, t, l in zip(batch["prefix_tokens"], batch["prefix_mask"],
                                 batch["targets"], batch["loss_mask"])]
  assert all(any(text.startswith(c[:20]) for c in photos.CAPTIONS.values()) for text in texts)
  assert catalog.tasks()["photos"].kind == "pairs"
