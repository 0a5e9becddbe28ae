"""The grain pipeline: catalog entries -> this process's share of each global batch.

Per task: random-access source -> seeded index shuffle, reshuffled every epoch, repeated
forever. Tasks are mixed by the mixture rates (grain's deterministic weighted interleave, so
realised proportions match the rates exactly over any long window). That mixed stream is the
same in every process and defines the global batches (batch b = elements b*G .. b*G+G-1);
process i of n reads only rows i*G/n .. (i+1)*G/n - 1 of each, so the global batch does not
depend on how many processes share it (ProcessRows). Each element is preprocessed and
converted with a generator seeded by (seed, global stream position), so a given step always
sees the same examples and prefix lengths. Bad records are skipped and counted
(health.py); batching and the heavy per-example work run in worker processes when
`num_workers > 0`.
"""
import importlib

import numpy as np

import grain

from vlm_jax.data import catalog, converters, health, preprocessors
from vlm_jax.data import processor as processor_lib
from vlm_jax.data.vocab import Vocab


def _prefix_lm_config(data_config):
  return converters.PrefixLMConfig(
      prefix_length=data_config.prefix_length, suffix_length=data_config.suffix_length,
      image_size=data_config.image_size,
      pair_zero_prefix_prob=data_config.pair_zero_prefix_prob)


class ExampleProcessor(processor_lib.RecordProcessor):
  """Raw record -> SimVLM example (PrefixLM pair or text document)."""

  def __init__(self, data_config, seed, pair_prefix_length=None):
    super().__init__(seed)
    self.vocab = Vocab(data_config.vocab_path)
    self.cfg = _prefix_lm_config(data_config)
    self.resize_mode = data_config.resize_mode
    self.max_pixels = data_config.max_pixels
    self.pair_prefix_length = pair_prefix_length

  def text_ids(self, text):
    ids = self.vocab.encode(text)
    if not ids:
      raise preprocessors.BadRecord("text encodes to no tokens")
    return ids

  def convert(self, spec, raw, rng):
    if spec.kind == "pairs":
      image = preprocessors.load_image(raw["image"], self.cfg.image_size, self.resize_mode,
                                       self.max_pixels)
      ids = self.text_ids(preprocessors.caption_of(raw))
      return converters.prefix_lm_pair(image, ids, self.cfg, rng, spec.loss_weight,
                                       self.pair_prefix_length)
    text = raw["text"]
    if raw.get("json_field"):
      text = preprocessors.text_from_json_line(text, raw["json_field"])
    ids = self.text_ids(preprocessors.clean_text(text))
    if len(ids) < 2:
      raise preprocessors.BadRecord("document shorter than 2 tokens")
    return converters.prefix_lm_text(ids, self.cfg, rng, spec.loss_weight)


class _Tagged:
  """Pairs each record with its task spec so one processor serves the whole mixture."""

  def __init__(self, spec):
    self.spec = spec

  def __call__(self, record):
    return (self.spec, record)


# config.data.converter -> ("module:ExampleProcessor class", example kinds it accepts). A
# processor is built as cls(data_config, seed) and called as (index, (task spec, raw
# record)) -> example dict | health.Skipped; its module is imported only when selected (and
# may add its tasks and mixtures to the catalog on import).
CONVERTERS = {
    "simvlm_prefix_lm": ("vlm_jax.data.pipeline:ExampleProcessor", ("pairs", "text")),
    "minigpt_v2": ("vlm_jax.data.minigpt_v2:ExampleProcessor", ("pairs",)),
    "cogagent": ("vlm_jax.data.cogagent:ExampleProcessor", ("pairs",)),
    "flamingo": ("vlm_jax.data.flamingo:ExampleProcessor", ("interleaved", "pairs")),
    "prismer": ("vlm_jax.data.prismer:ExampleProcessor", ("pairs",)),
}


def register_converter(name, target: str, kinds=("pairs", "text")):
  CONVERTERS[name] = (target, tuple(kinds))


def converter(name):
  """(processor class, accepted kinds) for `config.data.converter`."""
  if name not in CONVERTERS:
    raise ValueError(f"unknown converter {name!r} (config data.converter); available: "
                     f"{sorted(CONVERTERS)}")
  target, kinds = CONVERTERS[name]
  module, _, attr = target.partition(":")
  return getattr(importlib.import_module(module), attr), kinds


def _task_seed(seed, number):
  return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


def _process_info(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return process_index, process_count


def task_dataset(spec, data_config, split, *, seed, shuffle=True) -> grain.MapDataset:
  source = catalog.make_source(spec, data_config.data_dir, split)
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed).repeat()
  return ds.map(_Tagged(spec))


def mixed_records(data_config, *, seed, split="train") -> grain.MapDataset:
  """The endless, shuffled, mixed stream of (task spec, raw record); the same in every
  process."""
  _, kinds = converter(data_config.converter)
  mixture = catalog.resolve(data_config.mixture)
  for name, _ in mixture.rates:
    if catalog.TASKS[name].kind not in kinds:
      raise ValueError(f"task {name!r} holds {catalog.TASKS[name].kind!r} examples; the "
                       f"{data_config.converter!r} converter takes {', '.join(kinds)}")
  tasks = [
      task_dataset(catalog.TASKS[name], data_config, split, seed=_task_seed(seed, i))
      for i, (name, _) in enumerate(mixture.rates)]
  rates = [rate for _, rate in mixture.rates]
  return tasks[0] if len(tasks) == 1 else grain.MapDataset.mix(tasks, rates)


class ProcessRows(grain.MapDataset):
  """Process i's rows of each global batch of `parent`, as (global index, element).

  Element k of process i is element b*G + i*P + r of the global stream, where
  b, r = divmod(k, P), P rows per process and G = n*P; every process addresses the whole
  source but reads only its own rows (random access), and no two processes read the same.
  """

  def __init__(self, parent: grain.MapDataset, per_process: int, process_index: int,
               process_count: int):
    super().__init__(parent)
    self._per_process, self._process_index = per_process, process_index
    self._global_batch = per_process * process_count

  def __len__(self) -> int:
    return len(self._parent) // self._global_batch * self._per_process

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    batch, row = divmod(index, self._per_process)
    position = batch * self._global_batch + self._process_index * self._per_process + row
    return position, self._parent[position]


class _AtGlobalIndex:
  """Calls an ExampleProcessor with the element's global stream position (picklable)."""

  def __init__(self, processor):
    self.processor = processor

  def __call__(self, indexed):
    position, record = indexed
    return self.processor(position, record)


def make_dataset(data_config, *, global_batch_size, seed, split="train", process_index=None,
                 process_count=None) -> grain.IterDataset:
  processor_cls, _ = converter(data_config.converter)
  process_index, process_count = _process_info(process_index, process_count)
  if global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by "
                     f"{process_count} processes")
  seed = int(np.random.SeedSequence([seed, data_config.seed]).generate_state(1)[0])
  per_process = global_batch_size // process_count
  ds = ProcessRows(mixed_records(data_config, seed=seed, split=split), per_process,
                   process_index, process_count)
  # Threads overlap file reads and PIL work (which releases the GIL); the buffer is in
  # examples, so keep it near a batch: at 224 px each example is 0.6 MB of float32.
  read_options = grain.ReadOptions(num_threads=data_config.read_threads,
                                   prefetch_buffer_size=max(2 * per_process, 16))
  # Seeded by global stream position (not process), so any process count draws the same.
  processor = _AtGlobalIndex(processor_cls(data_config, _task_seed(seed, 1000)))
  ds = ds.map(processor).to_iter_dataset(read_options)
  ds = health.SkipBadRecords(ds, data_config.bad_window, data_config.max_bad_fraction,
                             data_config.warn_every_s)
  ds = ds.batch(per_process, drop_remainder=True)
  if data_config.num_workers > 0:
    _allow_grain_flags()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data_config.num_workers,
        per_worker_buffer_size=data_config.worker_buffer_size))
  return health.CountSkipped(ds)


def make_train_iterator(data_config, *, global_batch_size, seed, split="train",
                        process_index=None, process_count=None) -> grain.DatasetIterator:
  """This process's rows of each global batch, forever; checkpointable with orbax
  (grain.checkpoint.CheckpointSave/Restore). `process_index`/`process_count` default to
  jax's. Skipped-record totals: `skipped_record_counts(iterator)`."""
  return iter(make_dataset(data_config, global_batch_size=global_batch_size, seed=seed,
                           split=split, process_index=process_index,
                           process_count=process_count))


def skipped_record_counts(iterator) -> dict:
  """{'examples': n, 'skipped_records': m} delivered so far by this process's iterator."""
  return dict(iterator.counters)


def make_eval_batches(data_config, *, batch_size, num_batches=1, split="validation"):
  """Deterministic held-out batches for captioning: [(batch, captions)], prefix length 0.

  Uses the first image-text task of the mixture, records in file order; every process gets
  the same batches.
  """
  mixture = catalog.resolve(data_config.mixture)
  pairs = [catalog.TASKS[n] for n, _ in mixture.rates if catalog.TASKS[n].kind == "pairs"]
  if not pairs:
    raise ValueError(f"mixture {mixture.name!r} has no image-text task to caption")
  ds = task_dataset(pairs[0], data_config, split, seed=0, shuffle=False)
  processor = ExampleProcessor(data_config, data_config.seed, pair_prefix_length=0)
  out, examples, captions = [], [], []
  for index in range(len(ds)):
    spec, raw = ds[index]
    example = processor(index, (spec, raw))
    if isinstance(example, health.Skipped):
      continue
    example.pop("_source")
    examples.append(example)
    captions.append(preprocessors.caption_of(raw))
    if len(examples) == batch_size:
      out.append(({k: np.stack([e[k] for e in examples]) for k in examples[0]}, captions))
      examples, captions = [], []
      if len(out) == num_batches:
        break
  return out


def _allow_grain_flags():
  """grain reads absl flags in worker set-up; outside absl.app.run they are unparsed."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
