"""What each dataset and blend is, in plain Python: the one list both executors read.

`tasks.py` registers these as seqio Tasks/Mixtures (the declarative view users inspect);
`pipeline.py` builds grain datasets from the same entries. The grain path reads this module
rather than seqio's registry because importing seqio pulls in TensorFlow (~5 s), which
every training process and each grain worker would otherwise pay.
"""
import dataclasses
import glob
import json
import os
from typing import Any, Callable

from vlm_jax.data import photos, sources, synthetic


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  name: str
  kind: str  # "pairs" (image + caption) | "text" (document)
  format: str  # key of READERS
  pattern: str  # glob under the data dir; `{split}` is filled in
  loss_weight: float = 1.0
  synthetic: bool = False  # the sample data, generated on first use when missing
  ensure: Callable[[str], Any] | None = None  # other generated data: ensure(data_dir)


@dataclasses.dataclass(frozen=True)
class MixtureSpec:
  name: str
  rates: tuple  # ((task name, rate), ...)


READERS = {
    "webdataset": sources.WebDatasetSource,
    "jsonl": sources.JsonlTextSource,
    "arrayrecord": sources.ArrayRecordSource,
}
INGEST_MANIFEST = "dataset.json"  # written by ingest.py

TASKS = {}
MIXTURES = {}


def add_task(spec: TaskSpec):
  TASKS[spec.name] = spec
  return spec


def add_mixture(spec: MixtureSpec):
  for task, _ in spec.rates:
    if task not in TASKS:
      raise KeyError(f"mixture {spec.name!r} names unknown task {task!r}")
  MIXTURES[spec.name] = spec
  return spec


add_task(TaskSpec("synthetic_pairs", "pairs", "webdataset",
                  f"{synthetic.SUBDIR}/pairs/{{split}}/*.tar", synthetic=True))
add_task(TaskSpec("synthetic_text", "text", "jsonl",
                  f"{synthetic.SUBDIR}/text/{{split}}/*.jsonl", synthetic=True))
add_task(TaskSpec("photos", "pairs", "webdataset", f"{photos.SUBDIR}/{{split}}/*.tar",
                  ensure=photos.ensure_photos))
# SimVLM trains pairs and text-only PrefixLM in the same batches; pairs dominate because
# captioning is what the sample run is judged on.
add_mixture(MixtureSpec("pretrain_simvlm", (("synthetic_pairs", 0.8), ("synthetic_text", 0.2))))


def task_from_directory(path: str) -> TaskSpec:
  """A directory written by `vlm-data ingest`, as a task named by its path."""
  with open(os.path.join(path, INGEST_MANIFEST)) as f:
    manifest = json.load(f)
  return add_task(TaskSpec(path, manifest["kind"], "arrayrecord",
                           os.path.join(os.path.abspath(path), "*.array_record")))


def resolve(name: str) -> MixtureSpec:
  """A mixture by name, a single task as a mixture of one, or an ingested directory."""
  if name not in TASKS and os.path.isfile(os.path.join(name, INGEST_MANIFEST)):
    task_from_directory(name)
  if name in MIXTURES:
    return MIXTURES[name]
  if name in TASKS:
    return MixtureSpec(name, ((name, 1.0),))
  raise KeyError(f"unknown mixture or task {name!r}; known: "
                 f"{sorted(MIXTURES) + sorted(TASKS)} (config data.mixture)")


def files(spec: TaskSpec, data_dir: str, split: str) -> list:
  data_dir = data_dir or synthetic.default_data_dir()
  if spec.synthetic:
    synthetic.ensure_sample_data(data_dir)
  if spec.ensure:
    spec.ensure(data_dir)
  # An ingested directory has one split; its absolute pattern ignores data_dir.
  pattern = os.path.join(data_dir, spec.pattern.format(split=split))
  paths = sorted(glob.glob(pattern))
  if not paths:
    raise FileNotFoundError(f"task {spec.name!r}: no files match {pattern!r} "
                            "(config data.data_dir; `vlm-data ingest` writes them).")
  return paths


def make_source(spec: TaskSpec, data_dir: str, split: str):
  return READERS[spec.format](files(spec, data_dir, split))
