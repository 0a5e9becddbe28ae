"""Prismer expert labels: expert functions, scene truth, storage, tables, labelling, converter."""
import glob
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from vlm_jax.cli import data as data_cli
from vlm_jax.data import catalog, pipeline
from vlm_jax.data.families import prismer as prismer_data
from vlm_jax.data.ingest import experts
from vlm_jax.data.sources import arrayrecord, webdataset
from vlm_jax.data.synthetic import labelled_scenes
from vlm_jax.data.vocab import Vocab


def _foreground(image):
  pixels = np.asarray(image, np.int32)
  background = np.median(pixels.reshape(-1, 3), axis=0)
  return np.abs(pixels - background).max(axis=-1) > 60


def test_scene_truth_matches_the_rendered_pixels_and_depth_order():
  rng = np.random.default_rng(3)
  shapes = texts = 0
  for _ in range(40):
    image, caption, truth = labelled_scenes.sample_scene_with_truth(rng, 64)
    fg, inst = _foreground(image), truth.instances != experts.BACKGROUND
    if truth.words:
      texts += 1
      # The image's glyphs are anti-aliased, the id map's are not: same ink, to a pixel.
      assert (fg & inst).sum() > 0.8 * fg.sum()
      box = lambda m: np.array([np.nonzero(m)[1].min(), np.nonzero(m)[0].min(),
                                np.nonzero(m)[1].max(), np.nonzero(m)[0].max()])
      assert np.abs(box(fg) - box(inst)).max() <= 1
      assert " ".join(w for w, _ in truth.words) == caption
      ocr = experts.ocr_detection_expert(None, truth)
      for i, (_, (x0, y0, x1, y1)) in enumerate(truth.words):  # word ink inside its box
        ys, xs = np.nonzero(truth.instances == i)
        assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
        assert (ocr.ids[y0:y1, x0:x1] == i).mean() > 0.5
    else:
      shapes += 1
      np.testing.assert_array_equal(fg, inst)  # exact: shapes are drawn without anti-aliasing
      counts = {"a": 1, "two": 2, "three": 3}
      assert len(truth.classes) == sum(counts[g.split()[0]] for g in caption.split(" and "))
      depth = experts.depth_expert(None, truth)
      assert (depth[~inst] == 0).all()
      order = [int(depth[truth.instances == i].max()) for i in np.unique(truth.instances[inst])]
      assert order == sorted(order) and len(set(order)) == len(order)  # later = nearer
      seg = experts.seg_expert(None, truth)
      names = np.array(seg.names + ["-"])[np.where(seg.ids == 255, len(seg.names), seg.ids)]
      assert set(names[inst]) == set(truth.classes) and (names[~inst] == "-").all()
  assert shapes and texts


def test_object_boxes_cover_their_instances():
  rng = np.random.default_rng(0)
  image, _, truth = labelled_scenes.sample_scene_with_truth(rng, 64, text_fraction=0.0)
  det = experts.obj_detection_expert(None, truth)
  assert det.names == truth.classes
  last = len(truth.classes) - 1  # drawn last: nothing covers its box
  ys, xs = np.nonzero(truth.instances == last)
  assert (det.ids[ys.min():ys.max() + 1, xs.min():xs.max() + 1] == last).all()
  assert (det.ids == 255).any()


def test_edge_expert_finds_edges_and_nothing_else():
  flat = np.full((16, 16, 3), 120, np.uint8)
  assert (experts.edge_expert(flat) == 0).all()
  step = flat.copy()
  step[:, 8:] = 250
  edges = experts.edge_expert(step)
  assert edges[:, 7:9].min() == 255 and edges[:, :6].max() == 0 and edges[:, 10:].max() == 0


def test_experts_that_need_truth_say_so():
  with pytest.raises(experts.ExpertUnavailable, match="depth"):
    experts.depth_expert(np.zeros((8, 8, 3), np.uint8))


def test_labels_survive_storage():
  rng = np.random.default_rng(1)
  image, _, truth = labelled_scenes.sample_scene_with_truth(rng, 32)
  labels = experts.label_image(np.asarray(image), experts.ALL_EXPERTS, truth)
  header, blobs = experts.encode_labels(labels)
  decoded = experts.decode_labels(header, blobs)
  for name, label in labels.items():
    if isinstance(label, experts.LabelMap):
      np.testing.assert_array_equal(decoded[name].ids, label.ids)
      assert decoded[name].names == label.names
    else:
      np.testing.assert_array_equal(decoded[name], label)
  assert decoded["normal"].shape == (32, 32, 3) and decoded["depth"].shape == (32, 32)


def test_label_tables(tmp_path):
  default = experts.LabelTable("", 8)
  v = default.vector("circle")
  np.testing.assert_allclose(np.linalg.norm(v), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(v, experts.LabelTable("", 8).vector("circle"))
  assert not np.allclose(v, default.vector("square"))
  table = {"circle": np.arange(8.0), "background": -np.ones(8)}
  np.savez(tmp_path / "t.npz", names=np.array(list(table)), vectors=np.stack(list(table.values())))
  with open(tmp_path / "t.json", "w") as f:
    json.dump({k: v.tolist() for k, v in table.items()}, f)
  label = experts.LabelMap(np.array([[0, 255]], np.uint8), ["circle"])
  for path in (tmp_path / "t.npz", tmp_path / "t.json"):
    out = experts.LabelTable(str(path), 8).embed(label)
    np.testing.assert_array_equal(out[0, 0], np.arange(8.0))
    np.testing.assert_array_equal(out[0, 1], -np.ones(8))
    with pytest.raises(KeyError, match="square"):
      experts.LabelTable(str(path), 8).vector("square")
  with pytest.raises(ValueError, match="label_dim"):
    experts.LabelTable(str(tmp_path / "t.npz"), 16)


def test_vlm_data_experts_labels_tars_with_edges_and_precomputed_labels(tmp_path, data_dir,
                                                                         data_config):
  tars = os.path.join(data_dir, "synthetic", "pairs", "validation", "*.tar")
  with pytest.raises(experts.ExpertUnavailable, match="--labels"):
    data_cli.main(["experts", "--input", tars, "--output", str(tmp_path / "nope"),
                   "--experts", "edge,depth"])
  # Precomputed depth and segmentation for all but one image (that one is skipped).
  source = webdataset.WebDatasetSource(sorted(glob.glob(tars)))
  keys = [source[i]["key"] for i in range(len(source))]
  labels = tmp_path / "labels"
  for name in ("depth", "seg"):
    os.makedirs(labels / name)
  for i, key in enumerate(keys[1:]):
    Image.fromarray(np.full((16, 16), i % 200, np.uint8)).save(labels / "depth" / f"{key}.png")
    seg = np.full((16, 16), 255, np.uint8)
    seg[:8] = 0
    Image.fromarray(seg).save(labels / "seg" / f"{key}.png")
    with open(labels / "seg" / f"{key}.json", "w") as f:
      json.dump({"0": "sky"}, f)
  out = tmp_path / "labelled"
  data_cli.main(["experts", "--input", tars, "--output", str(out), "--experts",
                 "edge,depth,seg", "--labels", str(labels)])
  manifest = json.load(open(out / "dataset.json"))
  assert manifest["records"] == len(keys) - 1
  assert manifest["skipped"] == {"missing precomputed label": 1}
  # Each record: the pair, edges of its image, the precomputed depth and seg at its size.
  written = arrayrecord.ArrayRecordSource(glob.glob(str(out / "*.array_record")))
  assert [written[i]["key"] for i in range(len(written))] == keys[1:]
  for i in range(len(written)):
    record, original = written[i], source[i + 1]
    assert record["image"] == original["image"]
    assert record["text"] == " ".join(original["text"].split())
    labels = experts.decode_labels(record["experts"], record["images"])
    assert list(labels) == ["edge", "depth", "seg"]
    image = np.asarray(Image.open(io.BytesIO(record["image"])).convert("RGB"))
    np.testing.assert_array_equal(labels["edge"], experts.edge_expert(image))
    assert labels["depth"].shape == image.shape[:2] and (labels["depth"] == i % 200).all()
    assert labels["seg"].names == ["sky"]
    rows = image.shape[0] // 2
    assert (labels["seg"].ids[:rows] == 0).all() and (labels["seg"].ids[rows:] == 255).all()
  # The output is a task by its path; Prismer's processor makes model inputs from it.
  data_config.mixture = str(out)
  data_config.experts = ("edge", "seg")
  data_config.expert_size = 16
  data_config.text_length = 12
  data_config.label_dim = 8
  data_config.label_table = ""
  batch = next(pipeline.make_train_iterator(data_config, "prismer", global_batch_size=4, seed=0,
                                            process_index=0, process_count=1))
  assert batch["images"].shape == (4, 1, 32, 32, 3)
  assert batch["expert_edge"].shape == (4, 16, 16, 1)
  assert batch["expert_edge"].min() == -1 and batch["expert_edge"].max() == pytest.approx(1)
  table = experts.LabelTable("", 8)
  np.testing.assert_allclose(batch["expert_seg"][:, :8], np.broadcast_to(table.vector("sky"),
                                                                          (4, 8, 16, 8)))
  np.testing.assert_allclose(batch["expert_seg"][:, 8:],
                             np.broadcast_to(table.vector("background"), (4, 8, 16, 8)))
  assert "expert_depth" not in batch
  vocab = Vocab(data_config.vocab_path)
  for row in range(4):
    n = int(batch["loss_mask"][row].sum())
    assert batch["targets"][row, n - 1] == 1  # EOS
    np.testing.assert_array_equal(batch["tokens"][row, 1:n], batch["targets"][row, :n - 1])
    assert vocab.decode(batch["targets"][row, :n - 1].tolist())


def test_prismer_scenes_task_is_generated_on_first_use(data_dir, data_config):
  data_config.mixture = "prismer_scenes"
  data_config.experts = ("depth", "normal", "obj_detection", "ocr_detection")
  data_config.expert_size = 32
  data_config.text_length = 16
  data_config.label_dim = 64
  data_config.label_table = ""
  batch = next(pipeline.make_train_iterator(data_config, "prismer", global_batch_size=8, seed=0,
                                            process_index=0, process_count=1))
  assert os.path.isfile(os.path.join(data_dir, "synthetic_experts", "train", "dataset.json"))
  assert batch["expert_normal"].shape == (8, 32, 32, 3)
  assert batch["expert_ocr_detection"].shape == (8, 32, 32, 64)
  instances = batch["expert_obj_detection_instances"]
  assert instances.dtype == np.int32 and (instances == 255).any() and (instances < 255).any()
  source = catalog.make_source(catalog.tasks(prismer_data)["prismer_scenes"], data_dir,
                               "validation")
  assert len(source) == labelled_scenes.SIZES["validation"]
