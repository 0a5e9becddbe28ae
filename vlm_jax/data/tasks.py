"""seqio registrations: every catalog task is a seqio.Task, every blend a seqio.Mixture.

This is the declarative view (`seqio.get_mixture_or_task("pretrain_simvlm")`), served by
seqio's tf.data path from the same readers the grain pipeline uses. Training does not go
through here: seqio's grain backend is a stub and its feature converters drop `image`
(DESIGN.md), so pipeline.py executes the catalog with grain and our converters. Data comes
from `$VLM_JAX_DATA_DIR` (default ~/.cache/vlm_jax/sample_data); the vocabulary from
`$VLM_JAX_VOCAB` or the shipped sample model.

A seqio Mixture's get_dataset keeps only the declared output features (`text`), so the
`image` of pair tasks shows only when a task is inspected on its own; `vlm-data inspect
<mixture>` shows the examples as trained. Importing this module imports TensorFlow.
"""
import re

import numpy as np
import seqio
import tensorflow as tf

from vlm_jax.data import catalog, preprocessors, synthetic, vocab

SPLITS = ("train", "validation")
_SEQIO_NAME = re.compile(r"[\w\d.:_#]+")


def output_features():
  return {"text": seqio.Feature(seqio.SentencePieceVocabulary(vocab.resolve_path()),
                                add_eos=True)}


def _records(spec, split, keep=None):
  """Decoded records of one task in file order; bad records, and those `keep(raw)` rejects,
  are skipped."""
  source = catalog.make_source(spec, synthetic.default_data_dir(), split)
  for index in range(len(source)):
    raw = source[index]
    if keep is not None and not keep(raw):
      continue
    try:
      if spec.kind == "pairs":
        image = np.asarray(preprocessors.decode_image(raw["image"]), np.uint8)
        yield {"image": image, "text": preprocessors.caption_of(raw), "key": raw["key"]}
      else:
        text = raw["text"]
        if raw.get("json_field"):
          text = preprocessors.text_from_json_line(text, raw["json_field"])
        yield {"text": preprocessors.clean_text(text), "key": raw["key"]}
    except preprocessors.BadRecord:
      continue


class DatasetFn:
  """seqio dataset_fn for one catalog task (optionally only the records `keep` accepts)."""

  def __init__(self, spec, keep=None):
    self.spec, self.keep = spec, keep

  def __call__(self, split, shuffle_files=False, seed=None):
    del shuffle_files, seed  # seqio's get_dataset shuffles examples itself
    signature = {"text": tf.TensorSpec([], tf.string), "key": tf.TensorSpec([], tf.string)}
    if self.spec.kind == "pairs":
      signature["image"] = tf.TensorSpec([None, None, 3], tf.uint8)
    return tf.data.Dataset.from_generator(lambda: _records(self.spec, split, self.keep),
                                          output_signature=signature)


def register_all():
  for name, spec in catalog.TASKS.items():
    # Ingested directories are tasks named by their path, which seqio names cannot be.
    if not _SEQIO_NAME.fullmatch(name):
      continue
    if name not in seqio.TaskRegistry.names():
      seqio.TaskRegistry.add(
          name, source=seqio.FunctionDataSource(DatasetFn(spec), splits=SPLITS),
          preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
          output_features=output_features())
  for name, spec in catalog.MIXTURES.items():
    if name not in seqio.MixtureRegistry.names():
      seqio.MixtureRegistry.add(name, list(spec.rates))


register_all()
