"""`vlm-data ingest --runner beam`: the ingest of `local.py` as an Apache Beam pipeline.

The input files are read in parallel, one file per task, through the same per-file
function as the local executor (`local.read_file`: decode, validate, count bad records,
per-record filters). Only small keys travel to find duplicates and each record's place in
the output; the records themselves are shuffled twice (joined with their output index,
then grouped by shard):

  files --read_file--> (order, record) --------------------------------+
                  \\--> dedup keys -> earlier/later by key -> duplicates |
                   \\-> orders - duplicates -> rank per file + offsets  -+-> join by order
      -> group by shard -> sort by index -> ShardWriter -> statistics + manifest

With a labeller (`--experts`, e.g. Prismer's experts) the records that survive dedup are
labelled (joined with the surviving orders first when dedup is on) before they are ranked,
since a labeller may drop a record as bad; the ranks then count the labelled records.

`order` = (input file index, position in the file), so the kept records land in the same
shards in the same order as `local.run_local` writes them, whatever the runner or the
number of workers. Memory per worker: one shard's records while it is written.

Paths must be visible to every worker (a local disk for the DirectRunner, a shared
filesystem or gs:// on a cluster; gs:// only on Dataflow, checked by `check_dataflow`).
Shards, statistics and the manifest are written by our own steps through vlm_jax.storage,
never by a Beam sink. See data/README.md for DirectRunner, Flink and Dataflow commands;
`dry_run` builds a Dataflow job request without submitting it.
"""
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import (GoogleCloudOptions, PipelineOptions,
                                                  SetupOptions, StandardOptions, TestOptions,
                                                  WorkerOptions)
from apache_beam.portability.api import beam_runner_api_pb2

from vlm_jax import storage
from vlm_jax.data.ingest import filters as filters_lib
from vlm_jax.data.ingest import labellers
from vlm_jax.data.ingest import local as ingest


def pipeline_options(beam_options) -> PipelineOptions:
  """["key=value", ...] (the CLI's --beam_option) -> PipelineOptions; DirectRunner unless
  `runner=...` is given."""
  flags = []
  for item in beam_options:
    key, sep, value = item.partition("=")
    if not (sep and key):
      raise ValueError(f"--beam_option {item!r}: expected KEY=VALUE, e.g. "
                       "direct_num_workers=4")
    flags.append(f"--{key.lstrip('-')}={value}")
  if not any(f.startswith("--runner=") for f in flags):
    flags.append("--runner=DirectRunner")
  return PipelineOptions(flags)


class _ReadFiles(beam.DoFn):
  """(file index, path) -> (order, record) for valid, unfiltered records; Stats tagged."""

  def __init__(self, options):
    self._options = options
    self._lookup = None

  def setup(self):
    self._lookup = ingest.image_lookup(self._options)  # once per worker: indexes all tars

  def process(self, item):
    file_index, path = item
    stats = ingest.Stats()
    yield from ingest.read_file(file_index, path, self._options, stats, self._lookup)
    yield beam.pvalue.TaggedOutput("stats", stats)


class _MergeStats(beam.CombineFn):

  def create_accumulator(self):
    return ingest.Stats()

  def add_input(self, accumulator, stats):
    return accumulator.merge(stats)

  def merge_accumulators(self, accumulators):
    out = ingest.Stats()
    for accumulator in accumulators:
      out.merge(accumulator)
    return out

  def extract_output(self, accumulator):
    return accumulator


def _keys_of(item, filters):
  order, record = item
  for key in filters_lib.dedup_keys(record, filters):
    yield key, order


def _later_ones(item):
  """Every record but the first (in input order) that has this key is a duplicate."""
  (kind, _), orders = item
  for order in sorted(orders)[1:]:
    yield order, kind


def _duplicate_reason(item):
  order, kinds = item
  kinds = set(kinds)
  return order, next(k for k in filters_lib.DEDUP_KINDS if k in kinds)


def _reason_stats(item):
  stats = ingest.Stats()
  stats.remove(filters_lib.duplicate_reason(item[1]))
  return stats


def _unless_duplicate(item):
  order, grouped = item
  if not grouped["duplicate"]:
    yield order


def _ranks(item, offsets):
  file_index, positions = item
  for rank, position in enumerate(sorted(positions)):
    yield (file_index, position), offsets[file_index] + rank


def _offsets(counts):
  """[(file index, kept records)] -> {file index: index of its first record in the output}."""
  offsets, total = {}, 0
  for file_index, count in sorted(counts):
    offsets[file_index], total = total, total + count
  return offsets


def _with_index(item):
  _, grouped = item
  if grouped["index"]:
    (record,), (index,) = grouped["record"], grouped["index"]
    yield index, record


class _Label(beam.DoFn):

  def __init__(self, spec):
    self._spec = spec
    self._label = None

  def setup(self):
    self._label = labellers.make(self._spec)  # once per worker: may load a model

  def process(self, item):
    order, record = item
    stats = ingest.Stats()
    record = ingest.label_record(self._label, record, stats)
    if record is None:
      yield beam.pvalue.TaggedOutput("stats", stats)
    else:
      yield order, record


def _kept_record(item):
  order, grouped = item
  if grouped["kept"]:
    (record,) = grouped["record"]
    yield order, record


def _write_shard(item, staging, shard_size):
  shard, indexed = item
  indexed = sorted(indexed, key=lambda pair: pair[0])
  first = shard * shard_size
  if [i for i, _ in indexed] != list(range(first, first + len(indexed))):
    raise AssertionError(f"shard {shard}: record indices are not contiguous")
  stats, writer = ingest.Stats(), ingest.ShardWriter(staging, shard_size, first_shard=shard)
  for _, record in indexed:
    stats.output(record)
    writer.write(record)
  writer.close()
  return stats


def build(p, options: ingest.Options, paths, staging):
  """Adds the ingest to pipeline `p`; the last step writes statistics + manifest."""
  read = (p | "Files" >> beam.Create(list(enumerate(paths)))
          | "SpreadFiles" >> beam.Reshuffle()
          | "Read" >> beam.ParDo(_ReadFiles(options)).with_outputs("stats", main="records"))
  records = read.records
  stats = [read.stats]
  orders = records | "Orders" >> beam.Keys()
  if options.filters.dedup:
    reasons = (records | "DedupKeys" >> beam.FlatMap(_keys_of, options.filters)
               | "GroupByDedupKey" >> beam.GroupByKey()
               | "LaterOnes" >> beam.FlatMap(_later_ones)
               | "GroupDuplicates" >> beam.GroupByKey()
               | "Reason" >> beam.Map(_duplicate_reason))
    stats.append(reasons | "DuplicateStats" >> beam.Map(_reason_stats))
    orders = ({"order": orders | "AsKeys" >> beam.Map(lambda o: (o, None)),
               "duplicate": reasons}
              | "JoinDuplicates" >> beam.CoGroupByKey()
              | "Survivors" >> beam.FlatMap(_unless_duplicate))
  if options.experts:  # after dedup, before ranking: a labeller may drop a record
    if options.filters.dedup:
      records = ({"record": records, "kept": orders | "KeptKeys" >> beam.Map(
          lambda o: (o, None))}
                 | "JoinKept" >> beam.CoGroupByKey()
                 | "KeptRecords" >> beam.FlatMap(_kept_record))
    labelled = records | "Label" >> beam.ParDo(_Label(options.experts)).with_outputs(
        "stats", main="records")
    records = labelled.records
    stats.append(labelled.stats)
    orders = records | "LabelledOrders" >> beam.Keys()
  positions = orders | "GroupByFile" >> beam.GroupByKey()  # order = (file, position)
  offsets = (positions | "Counts" >> beam.Map(lambda item: (item[0], len(list(item[1]))))
             | "AllCounts" >> beam.combiners.ToList()
             | "Offsets" >> beam.Map(_offsets))
  ranks = positions | "Ranks" >> beam.FlatMap(_ranks, beam.pvalue.AsSingleton(offsets))
  indexed = ({"record": records, "index": ranks}
             | "JoinIndex" >> beam.CoGroupByKey()
             | "WithIndex" >> beam.FlatMap(_with_index))
  stats.append(
      indexed
      | "ByShard" >> beam.Map(lambda item: (item[0] // options.shard_size, item))
      | "GroupByShard" >> beam.GroupByKey()
      | "WriteShard" >> beam.Map(_write_shard, staging, options.shard_size))
  return (stats | "AllStats" >> beam.Flatten()
          | "MergeStats" >> beam.CombineGlobally(_MergeStats())
          | "Summary" >> beam.Map(
              lambda total: ingest.write_summary(staging, options, paths, total, "beam")))


def is_dataflow(beam_opts: PipelineOptions) -> bool:
  return (beam_opts.view_as(StandardOptions).runner or "").lower() in ("dataflowrunner",
                                                                       "dataflow")


def check_dataflow(beam_opts: PipelineOptions, paths: dict) -> None:
  """What a Dataflow job needs, each missing piece named by its flag: a project, a region,
  gs:// temp/staging locations, a way for the workers to get vlm_jax, and gs:// data
  (`paths`: flag -> path; workers share no disk with this machine)."""
  cloud = beam_opts.view_as(GoogleCloudOptions)
  missing = [f for f in ("project", "region", "temp_location") if not getattr(cloud, f)]
  if missing:
    raise ValueError("runner=DataflowRunner needs " + ", ".join(
        f"--beam_option {f}=..." for f in missing))
  for flag in ("temp_location", "staging_location"):
    value = getattr(cloud, flag)
    if value and not storage.is_gcs(value):
      raise ValueError(f"--beam_option {flag}={value}: Dataflow needs a gs:// location")
  setup = beam_opts.view_as(SetupOptions)
  if not (beam_opts.view_as(WorkerOptions).sdk_container_image or setup.setup_file or
          setup.requirements_file):
    raise ValueError("Dataflow workers need vlm_jax: --beam_option setup_file=./setup.py "
                     "(builds this checkout and installs it on each worker), "
                     "sdk_container_image=IMAGE (an image with vlm_jax installed) or "
                     "requirements_file=FILE (naming a vlm_jax package)")
  for flag, path in paths.items():
    if path and not storage.is_gcs(path):
      raise ValueError(f"{flag} {path}: Dataflow workers read and write gs:// paths only")


def _dry_run(options, paths, output_dir, beam_opts) -> dict:
  """Builds the pipeline and, on Dataflow, its job request (no submission, nothing
  written); returns what would run."""
  described = {"dry_run": True, "runner": beam_opts.view_as(StandardOptions).runner,
               "inputs": len(paths), "output": output_dir,
               "options": beam_opts.get_all_options(drop_default=True)}
  if not is_dataflow(beam_opts):
    return described
  beam_opts.view_as(TestOptions).dry_run = True
  p = beam.Pipeline(options=beam_opts)
  build(p, options, paths, output_dir)
  job = p.run().job
  components = job.proto_pipeline.components
  roots = [components.transforms[t] for t in job.proto_pipeline.root_transform_ids]
  return {**described, "job_name": job.proto.name,
          "steps": [components.transforms[t].unique_name
                    for root in roots for t in root.subtransforms],
          "worker_images": sorted({
              beam_runner_api_pb2.DockerPayload.FromString(env.payload).container_image
              for env in components.environments.values()})}


def run(options: ingest.Options, input_glob, output_dir, beam_options=(),
        dry_run=False) -> dict:
  start, paths = time.time(), ingest.list_inputs(input_glob)
  beam_opts = pipeline_options(beam_options)
  if is_dataflow(beam_opts):
    check_dataflow(beam_opts, {"--input": input_glob, "--output": output_dir,
                               "--images": options.image_tars})
  if dry_run:
    return _dry_run(options, paths, output_dir, beam_opts)
  staging = ingest.start_output(output_dir)
  with beam.Pipeline(options=beam_opts) as p:
    build(p, options, paths, staging)
  return ingest.finish_output(staging, output_dir, time.time() - start)
