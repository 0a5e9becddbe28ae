"""A seqio tasks module (config.data.tasks_module): RefCOCO as grounding records.

Registers the seqio Task `refcoco` over the TFDS dataset $VLM_REFCOCO_TFDS (default
ref_coco/refcoco_unc:1.1.0) in $VLM_REFCOCO_TFDS_DIR (default: TFDS's data dir). TFDS's
ref_coco holds per image `objects`, each with a `bbox` and a sequence of `refexp`s; the
preprocessor keeps every object's box and its first referring expression as the features
vlm_jax reads as a grounding record (`objects/bbox`, `objects/phrase`:
vlm_jax/data/sources/features.py). Its validation split serves `vlm-eval`.
"""
import os

import seqio
import tensorflow as tf

from vlm_jax.data import vocab

DATASET = os.environ.get("VLM_REFCOCO_TFDS", "ref_coco/refcoco_unc:1.1.0")
DATA_DIR = os.environ.get("VLM_REFCOCO_TFDS_DIR") or None


@seqio.map_over_dataset
def referred_objects(example):
  """Each object's box and first referring expression; masks and COCO annotations dropped."""
  expressions = example["objects"]["refexp"]["raw"]
  if isinstance(expressions, tf.RaggedTensor):
    expressions = expressions.to_tensor(default_value="")
  return {"image": example["image"],
          "objects": {"bbox": example["objects"]["bbox"], "phrase": expressions[:, 0]}}


seqio.TaskRegistry.add(
    "refcoco",
    source=seqio.TfdsDataSource(DATASET, tfds_data_dir=DATA_DIR),
    preprocessors=[referred_objects],
    output_features={"text": seqio.Feature(seqio.SentencePieceVocabulary(vocab.resolve_path()),
                                           required=False)})
