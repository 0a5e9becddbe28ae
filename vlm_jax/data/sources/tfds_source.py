"""TFDS datasets as random-access sources: `tfds:name[/config][:version]`.

A dataset prepared in the ArrayRecord file format is read with `tfds.data_source` (no
TensorFlow; random access), so grain shuffles, shards and resumes it exactly as it does
ingested shards. Images stay encoded (`SkipDecoding`): the family's processor decodes and
resizes each once. Examples become raw records by `features.py`'s mapping. Nothing is
downloaded or prepared here: build the dataset with its builder first
(`builder.download_and_prepare(file_format="array_record")`, or `tfds build
--file_format=array_record`). A dataset prepared as tfrecord can only be streamed: name it
through a seqio Task instead (`seqio_stream.py`).

`data_dir`: the mixture entry's, else config.data.tfds_data_dir, else TFDS's default
($TFDS_DATA_DIR or ~/tensorflow_datasets).
"""
from vlm_jax.data.sources import features

PREFIX = "tfds:"


class SourceError(ValueError):
  """A TFDS source that cannot be read (unknown, not prepared, wrong format, no split)."""


def dataset_name(source: str) -> str:
  """'tfds:name/config:version' -> 'name/config:version'."""
  name = source[len(PREFIX):].strip()
  if not name:
    raise SourceError(f"{source!r} names no dataset (expected tfds:name[/config][:version])")
  return name


def _builder(name: str, data_dir: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError:
    raise SourceError(f"no TFDS dataset {name!r} in data dir {data_dir or '(TFDS default)'} "
                      "(config.data.tfds_data_dir)") from None
  if not builder.is_prepared():
    raise SourceError(f"TFDS dataset {name!r} is not prepared in {builder.data_dir}; build "
                      "it first (file_format='array_record')")
  if builder.info.file_format.value != "array_record":
    raise SourceError(f"TFDS dataset {name!r} is stored as {builder.info.file_format.value}, "
                      "which has no random access; prepare it as array_record or read it "
                      "through a seqio Task")
  return builder


def _names(feature, prefix=""):
  """Flattened names of a FeaturesDict (sequences of dicts included), and the image ones."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if isinstance(feature, tfds.features.FeaturesDict):
    for key in feature.keys():
      yield from _names(feature[key], f"{prefix}{key}/")
  elif isinstance(feature, tfds.features.Sequence):
    yield from _names(feature.feature, prefix)
  else:
    yield prefix.rstrip("/"), isinstance(feature, tfds.features.Image)


def describe(name: str, data_dir: str, split: str) -> tuple[list, int]:
  """(flattened feature names, number of examples in `split`); SourceError otherwise."""
  builder = _builder(name, data_dir)
  try:
    count = builder.info.splits[split].num_examples
  except (KeyError, ValueError) as e:
    raise SourceError(f"TFDS dataset {name!r}: no split {split!r} ({e})") from None
  return [n for n, _ in _names(builder.info.features)], count


def has_split(name: str, data_dir: str, split: str) -> bool:
  try:
    return describe(name, data_dir, split)[1] > 0
  except SourceError:
    return False


def _skip_image_decoding(feature):
  """The `decoders` tree that keeps every Image feature encoded."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if isinstance(feature, tfds.features.FeaturesDict):
    tree = {k: _skip_image_decoding(feature[k]) for k in feature.keys()}
    return {k: v for k, v in tree.items() if v is not None} or None
  if isinstance(feature, tfds.features.Sequence):
    return _skip_image_decoding(feature.feature)
  return tfds.decode.SkipDecoding() if isinstance(feature, tfds.features.Image) else None


class TfdsSource:
  """One split of a prepared ArrayRecord TFDS dataset as raw records of `kind`."""

  def __init__(self, name: str, split: str, data_dir: str = "", fields=None, kind: str = ""):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = _builder(name, data_dir)
    names = [n for n, _ in _names(builder.info.features)]
    fields = dict(fields or {})
    self.name, self.split = name, split
    self._data = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False,
                                  decoders=_skip_image_decoding(builder.info.features))
    self._make = features.RecordMaker(kind or features.infer_kind(names, fields), names, fields,
                                      f"{PREFIX}{name}/{split}")

  @classmethod
  def for_spec(cls, spec, split: str, *, seed: int = 0, shuffle: bool = False):
    del seed, shuffle  # grain shuffles random-access sources
    args = dict(spec.args)
    return cls(spec.pattern, split, args.get("data_dir", ""), dict(args.get("fields", ())),
               spec.kind)

  def __len__(self):
    return len(self._data)

  def __getitem__(self, index):
    return self._make(self._data[index], index)

  def __repr__(self):
    return f"TfdsSource({self.name!r}, split {self.split!r}, {len(self)} examples)"
