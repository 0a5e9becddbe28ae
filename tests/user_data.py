"""A pretraining user's own data, made here (nothing is downloaded): TFDS datasets built by
TFDS builders, a seqio tasks module outside the package, and directories written by
`vlm-data ingest` from img2dataset shards and MMC4 documents (`make`, run once per session
by the `user_data` fixture of tests/conftest.py).

TFDS datasets: synthetic scenes (`vlm_jax.data.synthetic.scenes`) with their captions, and
with boxed phrases for grounding.

  vlm_test_captions   image (jpeg) + text
  vlm_test_grounding  image (jpeg) + text + objects {bbox: TFDS BBox, phrase: text}
  vlm_test_ref_coco   TFDS ref_coco's layout: image + objects {bbox, label,
                      refexp {refexp_id, raw}} (configs/examples/refcoco_tasks.py reads it)

The boxes are the scene groups' pixel extents (`synthetic.scene_objects`), so a model can
learn them. `prepare(builder, data_dir, file_format)` writes train and validation splits:
`array_record` for `tfds:` sources (random access), `tfrecord` for a seqio TfdsDataSource
(seqio reads TFDS with tf.data, which TFDS does not offer for ArrayRecord files).
"""
import os
import types

import numpy as np
import tensorflow_datasets as tfds

from vlm_jax.data import ingest
from vlm_jax.data.synthetic import sample_data, scene_objects, scenes

SIZE = 64
SPLITS = {"train": 192, "validation": 16}


def _scenes(split: str, count: int):
  rng = np.random.default_rng([20, 0 if split == "train" else 1])
  for index in range(count):
    groups = scenes.sample_scene(rng)
    pixels = np.asarray(scenes.render_scene(groups, SIZE, rng), np.uint8)
    yield index, pixels, scenes.describe(groups)


class VlmTestCaptions(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(SIZE, SIZE, 3), encoding_format="jpeg"),
        "text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split, n) for split, n in SPLITS.items()}

  def _generate_examples(self, split, count):
    for index, pixels, caption in _scenes(split, count):
      yield index, {"image": pixels, "text": caption}


class VlmTestGrounding(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(SIZE, SIZE, 3), encoding_format="jpeg"),
        "text": tfds.features.Text(),
        "objects": tfds.features.Sequence({"bbox": tfds.features.BBoxFeature(),
                                           "phrase": tfds.features.Text()})}))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split, n) for split, n in SPLITS.items()}

  def _generate_examples(self, split, count):
    for index, pixels, caption in _scenes(split, count):
      objects = scene_objects.scene_objects(pixels, caption)  # boxes in 0..100
      yield index, {"image": pixels, "text": caption, "objects": {
          "bbox": [tfds.features.BBox(o.box[1] / 100, o.box[0] / 100, o.box[3] / 100,
                                      o.box[2] / 100) for o in objects],
          "phrase": [o.phrase for o in objects]}}


class VlmTestRefCoco(VlmTestGrounding):
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(SIZE, SIZE, 3), encoding_format="jpeg"),
        "objects": tfds.features.Sequence({
            "bbox": tfds.features.BBoxFeature(), "label": np.int64,
            "refexp": tfds.features.Sequence({"refexp_id": np.int64,
                                              "raw": tfds.features.Text()})})}))

  def _generate_examples(self, split, count):
    for index, example in super()._generate_examples(split, count):
      objects = example["objects"]
      yield index, {"image": example["image"], "objects": [
          {"bbox": box, "label": number, "refexp": [
              {"refexp_id": 2 * number, "raw": phrase},
              {"refexp_id": 2 * number + 1, "raw": f"the {phrase}"}]}
          for number, (box, phrase) in enumerate(zip(objects["bbox"], objects["phrase"]))]}


def prepare(builder_class, data_dir: str, file_format: str = "array_record"):
  builder = builder_class(data_dir=data_dir, file_format=file_format)
  builder.download_and_prepare()
  return builder


# The user's tasks module: seqio Tasks over the tfrecord TFDS datasets (seqio's own
# TfdsDataSource) and over generated text, a seqio Mixture, and a metric function of its own.
TASKS_MODULE = '''"""seqio tasks of a pretraining user, registered on import."""
import numpy as np
import seqio
import tensorflow as tf

from vlm_jax.data import vocab
from vlm_jax.data.synthetic import scenes

TFDS_DIR = {tfds_dir!r}
OUTPUT = {{"text": seqio.Feature(seqio.SentencePieceVocabulary(vocab.resolve_path()),
                                add_eos=True)}}


def exact(targets, predictions):
  return {{"exact": 100.0 * float(np.mean([t == p for t, p in zip(targets, predictions)]))}}


def documents(split, shuffle_files=False, seed=None):
  rng = np.random.default_rng(0 if split == "train" else 1)
  texts = [scenes.sample_document(rng) for _ in range(300)]
  return tf.data.Dataset.from_tensor_slices({{"text": texts}})


def tfds_task(name, dataset, metric_fns=()):
  seqio.TaskRegistry.add(
      name, source=seqio.TfdsDataSource(dataset, tfds_data_dir=TFDS_DIR),
      preprocessors=[seqio.preprocessors.tokenize], output_features=OUTPUT,
      metric_fns=list(metric_fns))


tfds_task("user_captions", "vlm_test_captions:1.0.0", [exact])
tfds_task("user_grounding", "vlm_test_grounding:1.0.0")
seqio.TaskRegistry.add(
    "user_text", source=seqio.FunctionDataSource(documents, splits=("train", "validation")),
    preprocessors=[seqio.preprocessors.tokenize], output_features=OUTPUT)
seqio.MixtureRegistry.add("user_pretrain", [("user_captions", 3.0), ("user_text", 1.0)])
'''

SAMPLE = sample_data.SyntheticSizes(train_pairs=200, validation_pairs=16, train_docs=20,
                                    validation_docs=10, train_interleaved=60,
                                    validation_interleaved=8, shard_size=100, image_size=64)


def make(root: str) -> types.SimpleNamespace:
  """Everything under `root`: tfds (ArrayRecord), tfds_tfrecord, tasks_module (a .py file),
  laion (ingested img2dataset pairs), mmc4 (ingested MMC4 documents), c4 (ingested text)."""
  paths = types.SimpleNamespace(**{name: os.path.join(root, name) for name in (
      "tfds", "tfds_tfrecord", "laion", "mmc4", "c4")})
  for builder in (VlmTestCaptions, VlmTestGrounding):
    prepare(builder, paths.tfds, "array_record")
    prepare(builder, paths.tfds_tfrecord, "tfrecord")
  prepare(VlmTestRefCoco, paths.tfds_tfrecord, "tfrecord")
  paths.tasks_module = os.path.join(root, "user_tasks.py")
  with open(paths.tasks_module, "w") as f:
    f.write(TASKS_MODULE.format(tfds_dir=paths.tfds_tfrecord))
  synthetic = sample_data.ensure_sample_data(os.path.join(root, "downloads"), SAMPLE)
  ingest.run("img2dataset", os.path.join(synthetic, "pairs", "train", "*.tar"), paths.laion)
  ingest.run("mmc4", os.path.join(synthetic, "interleaved", "train", "mmc4.jsonl"), paths.mmc4)
  ingest.run("text", os.path.join(synthetic, "text", "train", "*.jsonl"), paths.c4)
  return paths
