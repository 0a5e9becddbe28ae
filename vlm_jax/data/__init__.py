"""Data: the core (vocab, records, preprocessors, health, catalog, pipeline, seqio view) and
sub-packages: `sources/` (random-access readers per format), `ingest/` (`vlm-data ingest`,
local and Beam), `families/` (each family's processor, tasks and evaluation tasks),
`synthetic/` (the sample data generators), `boxes/` (box text formats).

Entry point for training: `pipeline.make_train_iterator(config.data, family, ...)`.
`seqio_tasks` registers the seqio view (imports TensorFlow, so it is not imported here).
"""
