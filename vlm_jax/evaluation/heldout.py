"""Held-out examples as generation problems: (model inputs with the answer removed, truth).

Any family's training example works: the answer is the LAST loss span (the tokens whose
`loss_mask` is 1, ending where the mask drops; a multi-turn conversation keeps its earlier
turns as context, a few-shot document its support examples). Decoder-only examples
(`tokens` + `token_mask`) become the prompt `tokens[:start]` (the rest padded and masked);
encoder-decoder examples (`prefix_tokens`) keep their encoder inputs and the decoder starts
from BOS. The truth is the span's text; generation stops at the span's last target (EOS,
or Flamingo's `<|endofchunk|>`).
"""
import numpy as np

from vlm_jax.data import catalog, families, health, pipeline, processor as processor_lib

DROP = ("targets", "loss_mask", "loss_weight", "_source")


def processor(config, seed: int = 0):
  """The family's Processor, building examples the way evaluation asks for them."""
  return pipeline.make_processor(config.data, config.model.name, seed, evaluation=True)


def task_spec(config, name: str) -> catalog.TaskSpec:
  """The family's task `name`, or the mixture's source `name`, with its template resolved."""
  module = families.load(config.model.name)
  known = catalog.tasks(module)
  if name not in known:
    sources = {spec.name: spec for spec, _ in pipeline.resolve(config.data,
                                                               config.model.name).tasks}
    if name in sources:
      return sources[name]
    raise ValueError(f"unknown task {name!r} for evaluation of the {config.model.name!r} "
                     f"family; known: {sorted(known)}")
  return processor_lib.with_template(known[name], module.TEMPLATES, config.model.name)


def last_span(loss_mask: np.ndarray) -> tuple[int, int]:
  """[start, end) of the last run of loss_mask > 0."""
  on = np.flatnonzero(loss_mask > 0)
  if not on.size:
    raise ValueError("example has no loss span (no answer to evaluate)")
  end = on[-1] + 1
  start = end
  while start > 0 and loss_mask[start - 1] > 0:
    start -= 1
  return int(start), int(end)


def as_prompt(example: dict, pad_id: int) -> tuple[dict, np.ndarray, int]:
  """(inputs without the answer, answer target ids, stop id) for one example (its vocab's
  `pad_id` fills the answer's slots)."""
  start, end = last_span(example["loss_mask"])
  answer = np.asarray(example["targets"][start:end])
  inputs = {k: v for k, v in example.items() if k not in DROP}
  if "prefix_tokens" in example:  # encoder-decoder: the decoder generates from BOS
    inputs.pop("tokens", None)
    return inputs, answer, int(answer[-1])
  length = len(example["tokens"])
  tokens = np.full((length,), pad_id, np.int32)
  tokens[:start + 1] = example["tokens"][:start + 1]  # inputs[t] predicts targets[t]
  mask = np.zeros((length,), np.float32)
  mask[:start + 1] = 1.0
  inputs.update(tokens=tokens, token_mask=mask)
  return inputs, answer, int(answer[-1])


def load_examples(config, task_name: str, count: int, *, split: str = "validation",
                  keep=None) -> list[tuple[dict, dict]]:
  """The first `count` (example, raw record) of `task_name`'s split, in file order, that
  convert (bad records skipped) and pass keep(raw)."""
  spec = task_spec(config, task_name)
  ds = pipeline.task_dataset(spec, config.data, split, seed=0, shuffle=False)
  convert = processor(config)
  out = []
  for index in range(len(ds)):
    record = ds[index]
    if keep is not None and not keep(record[1]):
      continue
    example = convert(index, record)
    if isinstance(example, health.Skipped):
      continue
    out.append((example, record[1]))
    if len(out) == count:
      break
  if not out:
    raise ValueError(f"task {task_name!r} split {split!r} gave no usable examples")
  return out


def stack(examples: list[dict]) -> dict:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}
