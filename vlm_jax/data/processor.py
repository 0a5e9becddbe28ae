"""The base of every family's Processor: one raw record -> one model example.

A processor is built as cls(data_config, seed, evaluation=False) and called by the pipeline as
(index, (task spec, raw record)) in grain's worker processes (so it must pickle). Subclasses
write `convert(spec, raw, rng)`: `rng` is seeded by (seed, stream position), so a position
always converts the same way (a resumed run sees the same prefix lengths, crops, templates),
and raising `preprocessors.BadRecord` turns the record into a counted `health.Skipped`.
`spec.template` says which of the family's templates the record feeds (`with_template`
fills it in before records reach the processor); `evaluation=True` builds examples the way
held-out evaluation asks for them (e.g. SimVLM captions without a text prefix).
"""
import dataclasses

import numpy as np

from vlm_jax.data import health, preprocessors
from vlm_jax.data.vocab import Vocab


class RecordProcessor:
  """`data_config` (config.data) holds the family's fields the processor reads."""

  def __init__(self, data_config, seed: int, evaluation: bool = False):
    self.data_config, self.seed, self.evaluation = data_config, seed, evaluation
    self.vocab = Vocab(data_config.vocab_path)

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


def with_template(spec, templates: dict, family: str):
  """`spec` with its template resolved: its own, else the first of `templates` (template ->
  record kinds it takes) that takes `spec.kind`; an error names the task and field when the
  family has no such template or it does not take the task's records."""
  template = spec.template or next((t for t, kinds in templates.items() if spec.kind in kinds),
                                   None)
  if template is None:
    raise ValueError(f"task {spec.name!r} holds {spec.kind!r} records; no template of the "
                     f"{family!r} family takes them (templates: {templates})")
  if template not in templates:
    raise ValueError(f"task {spec.name!r}: template {template!r} is not one of the "
                     f"{family!r} family's {sorted(templates)}")
  if spec.kind not in templates[template]:
    raise ValueError(f"task {spec.name!r} holds {spec.kind!r} records; the {family!r} "
                     f"template {template!r} takes {', '.join(templates[template])}")
  return dataclasses.replace(spec, template=template)
