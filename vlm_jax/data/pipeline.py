"""The grain pipeline: a family's mixture -> this process's share of each global batch.

Per task: random-access source -> seeded index shuffle, reshuffled every epoch, repeated
forever. Tasks are mixed by the mixture rates (grain's deterministic weighted interleave, so
realised proportions match the rates exactly over any long window). That mixed stream is the
same in every process and defines the global batches (batch b = elements b*G .. b*G+G-1);
process i of n reads only rows i*G/n .. (i+1)*G/n - 1 of each, so the global batch does not
depend on how many processes share it (ProcessRows). Each element is converted by the
family's Processor (`families/<family>.py`) with a generator seeded by (seed, global stream
position), so a given step always sees the same examples and prefix lengths. Bad records
are skipped and counted (health.py), and so are the examples of each task (the realised
rates, `data/rate/<task>` in the training metrics); with `data.packing`, each process packs
its examples into rows (packing.py) before batching; batching and the heavy per-example work
run in worker processes when `num_workers > 0`. A seqio task is a stream addressed by
position (`sources/seqio_stream.py`): seqio shuffles and repeats it, grain does not.
"""
import numpy as np

import grain

from vlm_jax.data import catalog, families, health, mixture as mixture_lib, packing


class _Tagged:
  """Pairs each record with its task spec so one processor serves the whole mixture."""

  def __init__(self, spec):
    self.spec = spec

  def __call__(self, record):
    return (self.spec, record)


def resolve(data_config, family: str) -> catalog.Mixture:
  """config.data.mixture for `family` (a name or a list of sources: mixture.py), each task's
  template resolved and checked against the family's templates; `mixture.MixtureError` (one
  line naming the field) otherwise."""
  return mixture_lib.resolve(data_config, family)


def make_processor(data_config, family: str, seed: int, evaluation: bool = False):
  """The family's Processor (data module `Processor(data_config, seed, evaluation)`)."""
  return families.load(family).Processor(data_config, seed, evaluation=evaluation)


def _task_seed(seed, number):
  return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


def _process_info(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return process_index, process_count


def task_dataset(spec, data_config, split, *, seed, shuffle=True) -> grain.MapDataset:
  """One task's records as (spec, raw record), shuffled and repeated forever, or once in
  file order (`shuffle=False`)."""
  source = catalog.make_source(spec, data_config.data_dir, split, seed=seed, shuffle=shuffle)
  ds = grain.MapDataset.source(source)
  if shuffle and not getattr(source, "shuffles_itself", False):
    ds = ds.shuffle(seed=seed).repeat()
  return ds.map(_Tagged(spec))


def mixed_records(data_config, family: str, *, seed, split="train",
                  mixture=None) -> grain.MapDataset:
  """The endless, shuffled, mixed stream of (task spec, raw record); the same in every
  process. `mixture`: `resolve(data_config, family)` when the caller has it."""
  mixture = mixture or resolve(data_config, family)
  tasks = [task_dataset(spec, data_config, split, seed=_task_seed(seed, i))
           for i, (spec, _) in enumerate(mixture.tasks)]
  rates = [rate for _, rate in mixture.tasks]
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
  """Calls an ExampleProcessor with the element's global stream position and marks the
  example with its task's number in `tasks` (picklable)."""

  def __init__(self, processor, tasks):
    self.processor, self.numbers = processor, {name: i for i, name in enumerate(tasks)}

  def __call__(self, indexed):
    position, record = indexed
    example = self.processor(position, record)
    if not isinstance(example, health.Skipped):
      example[health.TASK_KEY] = np.int32(self.numbers[record[0].name])
    return example


def make_dataset(data_config, family: str, *, global_batch_size, seed, split="train",
                 process_index=None, process_count=None) -> grain.IterDataset:
  process_index, process_count = _process_info(process_index, process_count)
  if global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by "
                     f"{process_count} processes")
  seed = int(np.random.SeedSequence([seed, data_config.seed]).generate_state(1)[0])
  per_process = global_batch_size // process_count
  mixture = resolve(data_config, family)
  tasks = [spec.name for spec, _ in mixture.tasks]
  ds = ProcessRows(mixed_records(data_config, family, seed=seed, split=split, mixture=mixture),
                   per_process, process_index, process_count)
  # Threads overlap file reads and PIL work (which releases the GIL); the buffer is in
  # examples, so keep it near a batch: at 224 px each example is 0.6 MB of float32.
  read_options = grain.ReadOptions(num_threads=data_config.read_threads,
                                   prefetch_buffer_size=max(2 * per_process, 16))
  # Seeded by global stream position (not process), so any process count draws the same.
  processor = _AtGlobalIndex(make_processor(data_config, family, _task_seed(seed, 1000)),
                             tasks)
  ds = ds.map(processor).to_iter_dataset(read_options)
  ds = health.SkipBadRecords(ds, data_config.bad_window, data_config.max_bad_fraction,
                             data_config.warn_every_s)
  if data_config.packing:
    layout = packing.layout_of(families.load(family), family, data_config)
    ds = layout.pack(ds, data_config, seed=_task_seed(seed, 2000))
  ds = ds.batch(per_process, drop_remainder=True)
  if data_config.num_workers > 0:
    _allow_grain_flags()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data_config.num_workers,
        per_worker_buffer_size=data_config.worker_buffer_size))
  return health.CountSkipped(ds, tasks)


def make_train_iterator(data_config, family: str, *, global_batch_size, seed, split="train",
                        process_index=None, process_count=None) -> grain.DatasetIterator:
  """This process's rows of each global batch, forever; checkpointable with orbax
  (grain.checkpoint.CheckpointSave/Restore). `process_index`/`process_count` default to
  jax's. Skipped-record totals: `skipped_record_counts(iterator)`."""
  return iter(make_dataset(data_config, family, global_batch_size=global_batch_size, seed=seed,
                           split=split, process_index=process_index,
                           process_count=process_count))


def skipped_record_counts(iterator) -> dict:
  """{'examples': n, 'skipped_records': m, 'examples/<task>': n_t, 'rate/<task>': n_t / n}
  delivered so far by this process's iterator (the realised mixture rates)."""
  return with_rates(iterator.counters)


def with_rates(counters: dict) -> dict:
  """An iterator's counters (or their sum over processes) and 'rate/<task>' of each task."""
  counts = dict(counters)
  total = counts["examples"]
  counts.update({f"rate/{key[len('examples/'):]}": value / total
                 for key, value in counters.items() if key.startswith("examples/") and total})
  return counts


def _allow_grain_flags():
  """grain reads absl flags in worker set-up; outside absl.app.run they are unparsed."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
