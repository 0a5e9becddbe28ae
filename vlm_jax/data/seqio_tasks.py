"""seqio registrations: every catalog task is a seqio.Task, every blend a seqio.Mixture.

This is the declarative view (`seqio.get_mixture_or_task("pretrain_simvlm")` after importing
this module), served by seqio's tf.data path from the same readers the grain pipeline uses.
Training does not go through here: seqio's grain backend is a stub and its feature
converters drop `image` (DESIGN.md), so pipeline.py executes the catalog with grain and the
family processors. A user's own seqio Tasks (`config.data.tasks_module`) are what training
does read from seqio: `sources/seqio_stream.py`. Data comes from `$VLM_JAX_DATA_DIR` (default ~/.cache/vlm_jax/sample_data); the vocabulary from
`$VLM_JAX_VOCAB` or the shipped sample model.

A seqio Mixture's get_dataset keeps only the declared output features (`text`), so the
`image` of pair tasks shows only when a task is inspected on its own; `vlm-data inspect
<mixture>` shows the examples as trained. Importing this module imports TensorFlow.
"""
import numpy as np
import seqio
import tensorflow as tf

from vlm_jax.data import catalog, families, preprocessors, vocab

SPLITS = ("train", "validation")


def output_features():
  return {"text": seqio.Feature(seqio.SentencePieceVocabulary(vocab.resolve_path()),
                                add_eos=True)}


def _records(spec, split, keep=None):
  """Decoded records of one task in file order; bad records, and those `keep(raw)` rejects,
  are skipped."""
  source = catalog.make_source(spec, catalog.default_data_dir(), split)
  for index in range(len(source)):
    raw = source[index]
    if keep is not None and not keep(raw):
      continue
    try:
      if spec.kind == "pairs":
        image = np.asarray(preprocessors.decode_image(raw["image"]), np.uint8)
        yield {"image": image, "text": preprocessors.caption_of(raw), "key": raw["key"]}
      elif spec.kind == "interleaved":  # the document's text; its images are left out
        yield {"text": " ".join(t for t in raw["texts"] if t), "key": raw["key"]}
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


def register(family=None):
  """The sample tasks and a family data module's tasks and mixtures."""
  for name, spec in catalog.tasks(family).items():
    if name not in seqio.TaskRegistry.names():
      seqio.TaskRegistry.add(
          name, source=seqio.FunctionDataSource(DatasetFn(spec), splits=SPLITS),
          preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
          output_features=output_features())
  for name, rates in catalog.mixtures(family).items():
    if name not in seqio.MixtureRegistry.names():
      seqio.MixtureRegistry.add(name, list(rates))


def register_all():
  """Every shipped family's tasks and mixtures."""
  register()
  for name in families.available():
    register(families.load(name))


register_all()  # seqio's idiom: importing a tasks module registers them
