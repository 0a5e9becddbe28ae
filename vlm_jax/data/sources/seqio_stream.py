"""A seqio Task as a source: its tf.data stream, addressed by position.

`config.data.tasks_module` names the user's module (a dotted module on the Python path, or a
`.py` file) that registers seqio Tasks and Mixtures when imported, the way t5x users declare
data; it is imported only by processes whose mixture names it (importing seqio imports
TensorFlow, ~5 s, and TensorFlow is kept off the GPUs).

Element j of the source is element j of `task.get_dataset(split, shuffle=True, seed,
num_epochs=None)` for training (seqio shuffles and repeats it; grain must not), or of one
pass in order for evaluation. Examples become raw records by `features.py`'s mapping (images
kept). Reads go forward; the last `window` elements are kept for grain's out-of-order
prefetch threads. A position behind them (or far ahead) restarts the stream and skips to it
(`tf.data.Dataset.skip`, which still runs the task's preprocessing): after a resume
(the grain iterator restored from a checkpoint) the stream is replayed from its start to the
restored position, so a resumed run sees exactly the examples of an uninterrupted one (seqio's
shuffle is seeded and tf.data is deterministic), at the cost of re-reading every element of
the task consumed so far (the `replayed` count; bench/data_throughput.py measures the rate).
Every reader (each JAX process, each grain worker) reads the whole stream and keeps its own
rows; sources with random access (ingested ArrayRecord, `tfds:` datasets) avoid both costs.
"""
import collections
import hashlib
import importlib
import importlib.util
import logging
import os
import sys
import threading

from vlm_jax.data.sources import features

PREFIX = "seqio:"
_IMPORT_LOCK = threading.Lock()


class SourceError(ValueError):
  """A tasks module or seqio task that cannot be used."""


def _seqio():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:  # tf.data runs on the host; leave accelerators to JAX
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TensorFlow already initialised by the user's module
    pass
  import seqio  # pylint: disable=g-import-not-at-top
  return seqio


def import_tasks(module: str):
  """Imports the tasks module once per process (a second import would register twice)."""
  seqio = _seqio()
  if not module:
    return seqio
  with _IMPORT_LOCK:
    if module.endswith(".py"):
      path = os.path.abspath(module)
      name = "vlm_jax_user_tasks_" + hashlib.sha1(path.encode()).hexdigest()[:12]
      if name not in sys.modules:
        if not os.path.isfile(path):
          raise SourceError(f"tasks module file {module!r} does not exist")
        spec = importlib.util.spec_from_file_location(name, path)
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[name] = loaded
        try:
          spec.loader.exec_module(loaded)
        except BaseException:
          del sys.modules[name]
          raise
    else:
      importlib.import_module(module)
  return seqio


def lookup(name: str, module: str):
  """The seqio Task or Mixture `name` (after importing `module`), or None."""
  seqio = import_tasks(module)
  name = name[len(PREFIX):] if name.startswith(PREFIX) else name
  if name in seqio.TaskRegistry.names() or name in seqio.MixtureRegistry.names():
    return seqio.get_mixture_or_task(name)
  return None


def tasks_and_rates(provider) -> list:
  """[(task name, rate)] of a seqio Mixture (sub-mixtures flattened), or [(task, 1.0)]."""
  if not hasattr(provider, "get_rate"):
    return [(provider.name, 1.0)]
  return [(task.name, float(provider.get_rate(task))) for task in provider.tasks]


def _dataset(task, split: str, seed: int, shuffle: bool):
  # In-memory caching only pays for a stream read again and again (training's).
  return task.get_dataset(None, split=split, shuffle=shuffle, seed=seed if shuffle else None,
                          num_epochs=None if shuffle else 1, trim_output_features=False,
                          try_in_mem_cache=shuffle)


def describe(task_name: str, module: str, split: str, require_examples: bool = False) -> list:
  """The flattened feature names of the task's examples (from the dataset's element spec;
  `require_examples` reads one); SourceError if `split` is not one of its splits or has no
  example."""
  task = lookup(task_name, module)
  if split not in task.splits:
    raise SourceError(f"seqio task {task_name!r} has no split {split!r} (its splits: "
                      f"{sorted(task.splits)})")
  dataset = _dataset(task, split, 0, False)
  if require_examples and not list(dataset.take(1).as_numpy_iterator()):
    raise SourceError(f"seqio task {task_name!r} split {split!r} has no examples")
  return list(features.flatten(dataset.element_spec))


def has_split(task_name: str, module: str, split: str) -> bool:
  return split in lookup(task_name, module).splits


def metric_functions(task_name: str, module: str) -> tuple:
  """(the task's predict metric functions, fn(text, is_target) applying its postprocessor)."""
  task = lookup(task_name, module)
  post = lambda text, is_target: task.postprocess_fn(text, example=None, is_target=is_target)
  return tuple(task.predict_metric_fns), post


class SeqioStream:
  """One split of a seqio task as a random-access source over its stream (module doc)."""

  def __init__(self, task_name: str, module: str, split: str, seed: int, shuffle: bool,
               kind: str, fields=None, window: int = 1024):
    self.task_name, self.module, self.split = task_name, module, split
    self.seed, self.shuffle, self.kind = int(seed), shuffle, kind
    self.fields, self.window = dict(fields or {}), window
    self.shuffles_itself = shuffle  # shuffled and repeated by seqio: grain must not
    self.replayed = 0  # elements read again to reach a position behind the window
    self._length = None
    self._lock, self._iterator = threading.Lock(), None

  @classmethod
  def for_spec(cls, spec, split: str, *, seed: int = 0, shuffle: bool = False):
    args = dict(spec.args)
    return cls(spec.pattern, args.get("tasks_module", ""), split, seed, shuffle, spec.kind,
               dict(args.get("fields", ())))

  def __getstate__(self):  # a reader's stream stays in its process
    return {k: v for k, v in self.__dict__.items()
            if k not in ("_lock", "_iterator", "_make", "_next", "_recent")}

  def __setstate__(self, state):
    self.__dict__.update(state, _lock=threading.Lock(), _iterator=None)

  def _start(self, position: int):
    task = lookup(self.task_name, self.module)
    dataset = _dataset(task, self.split, self.seed, self.shuffle)
    names = list(features.flatten(dataset.element_spec))
    decoders = {name: feature.vocabulary.decode for name, feature in
                task.output_features.items()}
    self._make = features.RecordMaker(self.kind, names, self.fields,
                                      f"{PREFIX}{self.task_name}/{self.split}", decoders)
    if position:
      logging.warning("seqio task %s: replaying its stream from the start to position %d "
                      "(a tf.data source has no random access)", self.task_name, position)
      self.replayed += position
    self._iterator = dataset.skip(position).as_numpy_iterator()
    self._next, self._recent = position, collections.OrderedDict()

  def __len__(self):
    if self.shuffle:
      return sys.maxsize
    if self._length is None:
      task = lookup(self.task_name, self.module)
      self._length = int(_dataset(task, self.split, 0, False).reduce(0, lambda n, _: n + 1))
    return self._length

  def __getitem__(self, index: int):
    with self._lock:
      behind = self._iterator is None or index < self._next - len(self._recent)
      if behind or index - self._next > self.window:  # skip rather than make records
        # Start a little before `index`: prefetch threads ask for nearby positions too.
        self._start(max(0, index - self.window // 4))
      while self._next <= index:
        self._recent[self._next] = self._make(next(self._iterator), self._next)
        self._next += 1
        if len(self._recent) > self.window:
          self._recent.popitem(last=False)
      return self._recent[index]

  def __repr__(self):
    return f"SeqioStream({self.task_name!r}, split {self.split!r})"
