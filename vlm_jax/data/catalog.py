"""What each dataset and blend is, in plain Python: the one list both executors read.

A task names its files (format + glob), the kind of record they hold, the family template
the records feed and a loss weight; a mixture names tasks with rates. The sample tasks below
are shared by every family; a family's data module (`families/<family>.py`) declares its own
`TASKS` and `MIXTURES` beside its processor, and an ingested directory is a task by its path.
`resolve(name, family)` turns any of these into a `Mixture` of concrete specs.

Sources that are not files are named: a TFDS dataset (`sources/tfds_source.py`, random
access) and a seqio task (`sources/seqio_stream.py`, its tf.data stream); `mixture.py` turns
`config.data.mixture` (a name or a list of sources) into a `Mixture` of such specs.

`pipeline.py` builds grain datasets from a `Mixture`; `seqio_tasks.py` registers the same
specs as seqio Tasks/Mixtures (the declarative view). The grain path does not go through
seqio's registry because importing seqio pulls in TensorFlow (~5 s), which every training
process and each grain worker would otherwise pay.
"""
import dataclasses
from typing import Any, Callable

from vlm_jax import storage
from vlm_jax.data import records
from vlm_jax.data.sources import arrayrecord, interleaved, jsonl, seqio_stream, tfds_source
from vlm_jax.data.sources import webdataset
from vlm_jax.data.synthetic import photos, sample_data

# grounding: an image with boxed phrases (`objects`, records.py), e.g. a TFDS grounding set
KINDS = ("pairs", "text", "interleaved", "grounding")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  name: str
  kind: str  # one of KINDS: image + caption | document | aligned texts and images | boxes
  format: str  # key of READERS (files), or of NAMED_SOURCES ("tfds", "seqio")
  pattern: str  # glob under the data dir (or absolute), `{split}` filled in; or the name
  # The family template the records feed (e.g. MiniGPT-v2's "vqa"); "" = the family's
  # default for `kind`. A field, never inferred from the task's name.
  template: str = ""
  loss_weight: float = 1.0
  # ensure(data_dir, split): writes generated data that is missing (sample data only).
  ensure: Callable[[str, str], Any] | None = None
  splits: tuple = ()  # ((pipeline split, the source's split), ...); unlisted: the same name
  args: tuple = ()  # ((key, value), ...) a named source's options (TFDS data dir, fields)


@dataclasses.dataclass(frozen=True)
class Mixture:
  name: str
  tasks: tuple  # ((TaskSpec, rate), ...)


@dataclasses.dataclass(frozen=True)
class EvalTask:
  """An evaluation problem on a task's held-out split, run by `vlm_jax.evaluation`:

  generate   greedy generation with the KV cache, then `metrics` of the generated answers
             against the truth (exact_match, cider, bleu4, vqa_accuracy, iou@0.5 in the
             family's `BOX_FORMAT`); `shots` > 0 builds few-shot interleaved prompts with
             `support` examples chosen at random or by image similarity
  rank       closed set: every held-out answer is a candidate for every prompt; accuracy of
             the true one having the highest log-likelihood
  zero_shot  classification by the likelihood of `class_prompt` filled with each of
             `classes`; the truth is `label(raw record)`
  """
  name: str
  source: str  # the task whose validation split it reads
  kind: str = "generate"
  metrics: tuple[str, ...] = ("exact_match", "cider", "bleu4")
  keep: Callable[[dict], bool] | None = None  # which raw records it evaluates
  shots: int = 0
  support: str = "random"  # few-shot support: 'random' (seeded) or 'similar'
  captions: bool = False  # image captioning: what `vlm-eval --coco-captions` runs
  classes: tuple[str, ...] = ()
  class_prompt: str = "{}"
  label: Callable[[dict], str | None] | None = None
  num_examples: int = 32
  max_new_tokens: int = 24
  # fn(targets, predictions) -> {metric: value} used instead of `metrics` (a seqio task's own
  # metric functions), each applied to texts after `postprocess(text, is_target)`.
  metric_fns: tuple = ()
  postprocess: Callable[[str, bool], str] | None = None


READERS = {
    "webdataset": webdataset.WebDatasetSource,
    "jsonl": jsonl.JsonlTextSource,
    "arrayrecord": arrayrecord.ArrayRecordSource,
    "mmc4": interleaved.Mmc4Source,
    "obelics": interleaved.ObelicsSource,
}


def _sample(data_dir, split):
  del split
  sample_data.ensure_sample_data(data_dir)


def _photos(data_dir, split):
  del split
  photos.ensure_photos(data_dir)


SAMPLE_PAIRS = f"{sample_data.SUBDIR}/pairs/{{split}}/*.tar"
SAMPLE_TEXT = f"{sample_data.SUBDIR}/text/{{split}}/*.jsonl"
SAMPLE_INTERLEAVED = f"{sample_data.SUBDIR}/interleaved/{{split}}"


def sample_task(name, kind, fmt, pattern, **fields) -> TaskSpec:
  """A task over the generated sample data (written on first use)."""
  return TaskSpec(name, kind, fmt, pattern, ensure=_sample, **fields)


# The sample data every family may read (synthetic/): scenes and rendered words with
# captions, text documents, and twenty real photographs.
SAMPLE_TASKS = (
    sample_task("synthetic_pairs", "pairs", "webdataset", SAMPLE_PAIRS),
    sample_task("synthetic_text", "text", "jsonl", SAMPLE_TEXT),
    TaskSpec("photos", "pairs", "webdataset", f"{photos.SUBDIR}/{{split}}/*.tar",
             ensure=_photos),
)


def tasks(family=None) -> dict:
  """{name: TaskSpec}: the sample tasks and the family data module's `TASKS`."""
  specs = SAMPLE_TASKS + tuple(getattr(family, "TASKS", ()))
  return {spec.name: spec for spec in specs}


def mixtures(family=None) -> dict:
  """{name: ((task name, rate), ...)} the family data module declares."""
  return dict(getattr(family, "MIXTURES", {}))


def task_from_directory(path: str) -> TaskSpec:
  """A directory written by `vlm-data ingest`, as a task named by its path."""
  manifest = records.read_manifest(path)
  return TaskSpec(path, manifest["kind"], "arrayrecord",
                  storage.join(storage.abspath(path), "*.array_record"))


def is_ingested(path: str) -> bool:
  return storage.exists(storage.join(path, records.MANIFEST))


def resolve(name: str, family=None) -> Mixture:
  """A mixture by name, a single task as a mixture of one, or an ingested directory."""
  known = tasks(family)
  if name in known:
    return Mixture(name, ((known[name], 1.0),))
  declared = mixtures(family)
  if name in declared:
    missing = [task for task, _ in declared[name] if task not in known]
    if missing:
      raise KeyError(f"mixture {name!r} names unknown task(s) {missing}")
    return Mixture(name, tuple((known[task], rate) for task, rate in declared[name]))
  if is_ingested(name):
    return Mixture(name, ((task_from_directory(name), 1.0),))
  raise KeyError(f"unknown mixture or task {name!r} (config data.mixture); known: "
                 f"{sorted(declared) + sorted(known)}, or a directory written by "
                 "`vlm-data ingest`")


def default_data_dir() -> str:
  return sample_data.default_data_dir()


def source_split(spec: TaskSpec, split: str) -> str:
  """The split of `spec`'s source that the pipeline's `split` ('train', 'validation') reads."""
  return dict(spec.splits).get(split, split)


def files(spec: TaskSpec, data_dir: str, split: str) -> list:
  data_dir = data_dir or default_data_dir()
  split = source_split(spec, split)
  if spec.ensure:
    spec.ensure(data_dir, split)
  # An ingested directory has one split; its absolute pattern ignores data_dir.
  pattern = storage.join(data_dir, spec.pattern.format(split=split))
  paths = storage.glob(pattern)
  if not paths:
    raise FileNotFoundError(f"task {spec.name!r}: no files match {pattern!r} "
                            "(config data.data_dir; `vlm-data ingest` writes them).")
  return paths


# Sources named rather than globbed: opened as fn(spec, source split, seed=, shuffle=).
NAMED_SOURCES = {"tfds": tfds_source.TfdsSource.for_spec,
                 "seqio": seqio_stream.SeqioStream.for_spec}


def make_source(spec: TaskSpec, data_dir: str, split: str, *, seed: int = 0,
                shuffle: bool = False):
  """A random-access source of `spec`'s `split`. A seqio task's stream is shuffled (by
  `seed`) and repeated by seqio itself when `shuffle` (its `shuffles_itself` is then True)."""
  if spec.format in NAMED_SOURCES:
    return NAMED_SOURCES[spec.format](spec, source_split(spec, split), seed=seed,
                                      shuffle=shuffle)
  return READERS[spec.format](files(spec, data_dir, split))
