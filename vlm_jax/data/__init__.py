"""Data: sample-data generator, readers, preprocessing, converters and the grain pipeline.

Entry points: `pipeline.make_train_iterator`, `pipeline.make_eval_batches`,
`defaults.default_data_config`; `tasks` registers the seqio view (imports TensorFlow, so it
is not imported here).
"""
