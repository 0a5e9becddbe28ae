"""`vlm-data ingest` / `vlm-data experts`: source files -> validated, filtered ArrayRecord
shards + dataset.json, locally (`local.py`) or on Apache Beam (`beam.py`); readers of the
source formats (`readers.py`), filters, and per-record labellers (`labellers.py`, Prismer's
experts in `experts.py`)."""


def run(fmt, input_glob, output_dir, *, runner="local", beam_options=(), dry_run=False,
        **options) -> dict:
  """Ingests with the chosen executor; `options` are `local.Options` fields. `dry_run`
  (Beam): builds the pipeline (and a Dataflow job request) and writes nothing."""
  from vlm_jax.data.ingest import local  # pylint: disable=g-import-not-at-top
  options = local.Options(format=fmt, **options)
  if runner == "local":
    if dry_run:
      raise ValueError("--dry-run is for --runner beam")
    return local.run_local(options, input_glob, output_dir)
  if runner == "beam":
    from vlm_jax.data.ingest import beam  # pylint: disable=g-import-not-at-top
    return beam.run(options, input_glob, output_dir, beam_options, dry_run)
  raise ValueError(f"runner {runner!r}: expected 'local' or 'beam' (--runner)")
