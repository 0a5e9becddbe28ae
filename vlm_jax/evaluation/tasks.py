"""Evaluation tasks and their metrics. A family declares its tasks (`catalog.EvalTask`: the
task whose validation split it reads, the kind of problem, metrics) as `EVAL_TASKS` in its
data module (`data/families/<family>.py`); boxes in answers are read in the family's
`BOX_FORMAT`.

`run(task, model, params, config)` returns ({metric: value}, [(truth, generated)]).
`vlm_jax.evaluation.seqio_tasks` registers every task with seqio (`eval:<name>`), with
these metric functions.

The sources of `config.data.mixture` that are read by name (TFDS datasets, seqio tasks) are
evaluation tasks too, by their mixture name, on their evaluation split (`source_tasks`).
"""
from typing import Callable

import numpy as np

from vlm_jax import decode
from vlm_jax.data import catalog, families, mixture
from vlm_jax.data.sources import seqio_stream
from vlm_jax.data.vocab import Vocab
from vlm_jax.evaluation import captions, fewshot, grounding, heldout, scoring, vqa

EvalTask = catalog.EvalTask


def family_tasks(config) -> dict:
  """{name: EvalTask} of the config's family."""
  return {t.name: t for t in getattr(families.load(config.model.name), "EVAL_TASKS", ())}


CAPTION_METRICS = ("exact_match", "cider", "bleu4")


def source_tasks(config) -> dict:
  """{name: EvalTask} of the mixture's TFDS and seqio sources with an evaluation split: the
  settings (metrics, answer length) of the family's evaluation task on a task of the same
  template, else captioning's; a seqio task's own metric functions when it has any."""
  named = [spec for _, spec, _ in mixture.sources(config.data, config.model.name)
           if spec.format in catalog.NAMED_SOURCES and mixture.has_split(spec, "validation")]
  if not named:
    return {}
  by_template = {}
  for task in family_tasks(config).values():
    if task.kind == "generate" and not task.shots:
      by_template.setdefault(heldout.task_spec(config, task.source).template, task)
  out = {}
  for spec in named:
    like = by_template.get(spec.template)
    fields = {"metrics": like.metrics if like else CAPTION_METRICS,
              "max_new_tokens": like.max_new_tokens if like else 24}
    if spec.format == "seqio":
      fns, postprocess = seqio_stream.metric_functions(spec.pattern,
                                                       dict(spec.args)["tasks_module"])
      if fns:
        fields.update(metric_fns=fns, postprocess=postprocess)
    out[spec.name] = EvalTask(spec.name, spec.name, **fields)
  return out


def tasks_for(config) -> list[str]:
  """The names of the evaluation tasks of the config's family and mixture sources."""
  return list(family_tasks(config)) + [n for n in source_tasks(config)
                                       if n not in family_tasks(config)]


def get(name: str, config) -> EvalTask:
  known = family_tasks(config)
  if name not in known:
    known = {**source_tasks(config), **known}
  if name not in known:
    raise ValueError(f"unknown evaluation task {name!r} for the {config.model.name!r} family; "
                     f"its tasks: {sorted(known)}")
  return known[name]


# ----------------------------------------------------------------------------------------
# Examples
# ----------------------------------------------------------------------------------------
def _examples(task, config, count, model, params, batch_size):
  if not task.shots:
    return heldout.load_examples(config, task.source, count, keep=task.keep)
  pool = heldout.load_examples(config, task.source, count + task.shots, keep=task.keep)
  raws = [raw for _, raw in pool]
  spec = heldout.task_spec(config, task.source)
  convert = heldout.processor(config)
  features = None
  if task.support == "similar":  # RICES: each pool pair's (first) image, as preprocessed
    features = fewshot.vision_features(model, params, fewshot.first_images(e for e, _ in pool),
                                       batch_size)
  supports = fewshot.support_sets(len(raws), min(count, len(raws)), task.shots, task.support,
                                  features=features)
  out = []
  for query, support in enumerate(supports):
    record = fewshot.interleaved_record(raws, support, query)
    out.append((convert(query, (spec, record)), raws[query]))
  return out


def _batches(items, batch_size):
  for i in range(0, len(items), batch_size):
    chunk = items[i:i + batch_size]
    yield chunk + [chunk[-1]] * (batch_size - len(chunk)), len(chunk)


def _text(vocab, ids, stop_id):
  ids = [int(i) for i in ids]
  if stop_id in ids:
    ids = ids[:ids.index(stop_id)]
  return vocab.decode(ids).strip()


def generate_texts(task: EvalTask, model, params, data_config, prompts, batch_size: int):
  """Greedy generations (text up to the stop token) for `heldout.as_prompt` triples."""
  vocab = Vocab(data_config.vocab_path)
  encoder_decoder = "prefix_tokens" in prompts[0][0]
  # The decoder of an encoder-decoder starts from bos; decoder-only prompts carry theirs.
  bos_id = vocab.require_bos("an encoder-decoder") if encoder_decoder else vocab.pad_id
  max_len = data_config.suffix_length if encoder_decoder else task.max_new_tokens
  stop_id = prompts[0][2]
  generated = []
  for chunk, real in _batches([p for p, _, _ in prompts], batch_size):
    out = decode.generate(model, params, heldout.stack(chunk), max_len, bos_id=bos_id,
                          eos_id=stop_id, pad_id=vocab.pad_id)
    generated += [_text(vocab, row, stop_id) for row in np.asarray(out.tokens)[:real]]
  return generated


METRICS = ("exact_match", "cider", "bleu4", "vqa_accuracy", "iou@0.5", "accuracy")


def _metric_value(name, targets, predictions, formats):
  if name == "exact_match":
    return captions.exact_match(predictions, [[t] for t in targets])
  if name == "cider":
    return captions.cider(predictions, [[t] for t in targets])
  if name == "bleu4":
    return captions.bleu(predictions, [[t] for t in targets])[3]
  if name == "vqa_accuracy":  # one synthetic answer stands for all 10 annotators
    return vqa.mean_vqa_accuracy(predictions, [[t] * 10 for t in targets])
  if name == "iou@0.5":
    if formats is None:
      raise ValueError("metric iou@0.5 needs the family's BOX_FORMAT (its data module)")
    boxes = [grounding.first_box(t, formats) for t in targets]
    return grounding.iou_accuracy(predictions, boxes, formats)
  assert name == "accuracy", name  # closed set: the chosen candidate is the truth
  return float(np.mean([p == t for p, t in zip(predictions, targets)]))


def metric_fn(name: str, formats=None) -> Callable:
  """A seqio-style metric function: fn(targets, predictions) -> {name: value}; `formats`: the
  box format module that iou@0.5 reads."""
  if name not in METRICS:
    raise ValueError(f"unknown metric {name!r}; expected one of {METRICS}")
  fn = lambda targets, predictions: {
      name: _metric_value(name, list(targets), list(predictions), formats)}
  fn.__name__ = name
  return fn


def metric_fns(task: EvalTask, formats=None) -> list[Callable]:
  names = task.metrics if task.kind == "generate" else ("accuracy",)
  return [metric_fn(name, formats) for name in names]


def score(metrics, generated: list[str], truths: list[str], formats=None) -> dict:
  out = {}
  for name in metrics:
    out.update(metric_fn(name, formats)(truths, generated))
  return out


# ----------------------------------------------------------------------------------------
# Runner
# ----------------------------------------------------------------------------------------
def run(task: EvalTask, model, params, config, *, num_examples: int | None = None,
        batch_size: int = 8) -> tuple[dict, list[tuple[str, str]]]:
  data_config = config.data
  vocab = Vocab(data_config.vocab_path)
  examples = _examples(task, config, num_examples or task.num_examples, model, params,
                       batch_size)
  prompts = [heldout.as_prompt(e, vocab.pad_id) for e, _ in examples]
  truths = [_text(vocab, answer, stop) for _, answer, stop in prompts]
  stop_id = prompts[0][2]
  if task.kind == "generate":
    generated = generate_texts(task, model, params, data_config, prompts, batch_size)
    if task.metric_fns:  # a seqio task's own
      metrics = {}
      for fn in task.metric_fns:
        metrics.update(fn([task.postprocess(t, True) for t in truths],
                          [task.postprocess(g, False) for g in generated]))
    else:
      metrics = score(task.metrics, generated, truths, families.box_format(config.model.name))
    return metrics, list(zip(truths, generated))
  suffix = data_config.get("suffix_length")
  inputs = [p for p, _, _ in prompts]
  if task.kind == "rank":
    labels = list(dict.fromkeys(truths))
    candidates = [vocab.encode(t) for t in labels]
    truth_index = [labels.index(t) for t in truths]
  elif task.kind == "zero_shot":
    labels = list(task.classes)
    candidates = [vocab.encode(task.class_prompt.format(c)) for c in labels]
    truth_index = [labels.index(task.label(raw)) for _, raw in examples]
  else:
    raise ValueError(f"task {task.name!r}: unknown kind {task.kind!r}")
  log_likelihoods = scoring.rank_candidates(model, params, inputs, candidates, stop_id,
                                            vocab=vocab,
                                            suffix_length=suffix, batch_size=batch_size)
  predicted = np.argmax(log_likelihoods, axis=1)
  samples = [(labels[t], labels[p]) for t, p in zip(truth_index, predicted)]
  metrics = score(("accuracy",), [p for _, p in samples], [t for t, _ in samples])
  # The mean log-likelihood of the true answers: finer-grained than accuracy (it moves
  # while the argmax does not).
  truth_ll = log_likelihoods[np.arange(len(truth_index)), truth_index]
  return dict(metrics, log_likelihood=float(np.mean(truth_ll)),
              num_candidates=float(len(labels))), samples
