"""The base of every converter's ExampleProcessor: one raw record -> one model example.

A processor is built as cls(data_config, seed) and called by the pipeline as
(index, (task spec, raw record)) in grain's worker processes (so it must pickle). Subclasses
write `convert(spec, raw, rng)`: `rng` is seeded by (seed, stream position), so a position
always converts the same way (a resumed run sees the same prefix lengths, crops, templates),
and raising `preprocessors.BadRecord` turns the record into a counted `health.Skipped`.
"""
import numpy as np

from vlm_jax.data import health, preprocessors


class RecordProcessor:

  def __init__(self, seed: int):
    self.seed = seed

  def convert(self, spec, raw: dict, rng: np.random.Generator) -> dict:
    raise NotImplementedError

  def __call__(self, index, record):
    spec, raw = record
    try:
      if raw.get("problem"):
        raise preprocessors.BadRecord(raw["problem"])
      example = self.convert(spec, raw, np.random.default_rng([self.seed, index]))
    except preprocessors.BadRecord as e:
      return health.Skipped(raw.get("source", spec.name), raw.get("key", "?"), str(e))
    example["_source"] = raw.get("source", spec.name)
    return example
