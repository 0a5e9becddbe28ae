"""Evaluation tasks on the embedded held-out splits, and the runner.

A task names the family data converter it runs with (config.data.converter), the catalog
task whose `validation` split it reads, and what it measures:

  generate   greedy generation with the KV cache (`vlm_jax.decode`), then `metrics` of the
             generated answers against the truth (exact_match, cider, bleu4,
             vqa_accuracy, iou@0.5 in the family's `box_format`); `shots` > 0 builds
             Flamingo-style few-shot prompts (`fewshot.py`) with `support` examples
             chosen at random or by image similarity
  rank       closed-set: every held-out answer is a candidate for every prompt; accuracy
             of the true one having the highest log-likelihood (`scoring.py`)
  zero_shot  classification by likelihood of "a photo of a {class}" over the scene shapes,
             on single-group scenes (truth: the caption's shape)

`run(task, model, params, config)` returns ({metric: value}, [(truth, generated)]).
`vlm_jax.evaluation.seqio_tasks` registers every task with seqio (`eval:<name>`), with
these metric functions.
"""
import dataclasses
from typing import Callable

import numpy as np

from vlm_jax import decode
from vlm_jax.data import catalog, preprocessors, scenes
from vlm_jax.data.vocab import Vocab
from vlm_jax.evaluation import captions, fewshot, grounding, heldout, scoring, vqa


def _caption(raw) -> str:
  return preprocessors.caption_of(raw) or ""


def is_scene(raw) -> bool:
  return any(shape in _caption(raw) for shape in scenes.SHAPES)


def _single_shape(raw):
  caption = _caption(raw)
  found = [s for s in scenes.SHAPES if s in caption]
  return found[0] if len(found) == 1 and " and " not in caption else None


@dataclasses.dataclass(frozen=True)
class EvalTask:
  name: str
  converter: str
  source: str
  kind: str = "generate"  # generate | rank | zero_shot
  metrics: tuple[str, ...] = ("exact_match", "cider", "bleu4")
  box_format: str = ""
  keep: Callable | None = None
  shots: int = 0
  support: str = "random"  # few-shot support: 'random' (seeded) or 'similar' (fewshot.py)
  captions: bool = False  # image captioning: the task `--coco-captions` runs (coco.py)
  num_examples: int = 32
  max_new_tokens: int = 24


def _tasks():
  caption = ("exact_match", "cider", "bleu4")
  tasks = [
      EvalTask("simvlm_scenes", "simvlm_prefix_lm", "synthetic_pairs", keep=is_scene,
               captions=True),
      EvalTask("simvlm_rendered_text", "simvlm_prefix_lm", "synthetic_pairs",
               keep=lambda raw: not is_scene(raw), num_examples=16),
      EvalTask("simvlm_rank_captions", "simvlm_prefix_lm", "synthetic_pairs", kind="rank",
               keep=is_scene, num_examples=16),
      EvalTask("simvlm_zero_shot_shapes", "simvlm_prefix_lm", "synthetic_pairs",
               kind="zero_shot", keep=lambda raw: _single_shape(raw) is not None,
               num_examples=16),
      EvalTask("minigpt_v2_caption", "minigpt_v2", "minigpt_v2_caption", metrics=caption,
               captions=True),
      EvalTask("minigpt_v2_vqa", "minigpt_v2", "minigpt_v2_vqa",
               metrics=("exact_match", "vqa_accuracy")),
      EvalTask("minigpt_v2_refer", "minigpt_v2", "minigpt_v2_refer",
               metrics=("exact_match", "iou@0.5"), box_format="minigpt_v2"),
      EvalTask("minigpt_v2_grounding", "minigpt_v2", "minigpt_v2_grounding",
               metrics=("exact_match", "iou@0.5"), box_format="minigpt_v2",
               max_new_tokens=40),
      EvalTask("cogagent_grounding", "cogagent", "cogagent_grounding",
               metrics=("exact_match", "iou@0.5"), box_format="cogagent"),
      EvalTask("cogagent_ocr", "cogagent", "cogagent_ocr", metrics=caption),
      EvalTask("flamingo_captions", "flamingo", "flamingo_pairs", metrics=caption,
               captions=True),
      EvalTask("flamingo_captions_2shot", "flamingo", "flamingo_pairs", metrics=caption,
               shots=2),
      EvalTask("flamingo_captions_2shot_similar", "flamingo", "flamingo_pairs",
               metrics=caption, shots=2, support="similar", num_examples=16),
      EvalTask("flamingo_rank_captions", "flamingo", "flamingo_pairs", kind="rank",
               keep=is_scene, num_examples=8),
      # Prismer generates from a decoder prompt: BOS here (a VQA question would follow it).
      EvalTask("prismer_captions", "prismer", "prismer_scenes", metrics=caption,
               captions=True),
      EvalTask("prismer_rank_captions", "prismer", "prismer_scenes", kind="rank",
               num_examples=16),
      EvalTask("prismer_zero_shot_shapes", "prismer", "prismer_scenes", kind="zero_shot",
               keep=lambda raw: _single_shape(raw) is not None, num_examples=16),
  ]
  return {t.name: t for t in tasks}


TASKS = _tasks()


def tasks_for(data_config) -> list[str]:
  """The tasks that run with this config's data converter."""
  return [n for n, t in TASKS.items() if t.converter == data_config.converter]


def get(name: str, data_config) -> EvalTask:
  if name not in TASKS:
    raise ValueError(f"unknown evaluation task {name!r}; available: {sorted(TASKS)}")
  task = TASKS[name]
  if task.converter != data_config.converter:
    raise ValueError(f"evaluation task {name!r} needs data.converter={task.converter!r}, "
                     f"the config has {data_config.converter!r}; tasks for it: "
                     f"{tasks_for(data_config)}")
  return task


# ----------------------------------------------------------------------------------------
# Examples
# ----------------------------------------------------------------------------------------
def _examples(task, data_config, count):
  if not task.shots:
    return heldout.load_examples(data_config, task.source, count, keep=task.keep)
  pool = heldout.load_examples(data_config, task.source, count + task.shots, keep=task.keep)
  raws = [raw for _, raw in pool]
  spec = catalog.TASKS[task.source]
  convert = heldout.processor(data_config)
  supports = fewshot.support_sets(raws, min(count, len(raws)), task.shots, task.support)
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
  max_len = data_config.suffix_length if encoder_decoder else task.max_new_tokens
  stop_id = prompts[0][2]
  generated = []
  for chunk, real in _batches([p for p, _, _ in prompts], batch_size):
    out = decode.generate(model, params, heldout.stack(chunk), max_len, eos_id=stop_id)
    generated += [_text(vocab, row, stop_id) for row in np.asarray(out.tokens)[:real]]
  return generated


METRICS = ("exact_match", "cider", "bleu4", "vqa_accuracy", "iou@0.5", "accuracy")


def _metric_value(name, targets, predictions, box_format):
  if name == "exact_match":
    return captions.exact_match(predictions, [[t] for t in targets])
  if name == "cider":
    return captions.cider(predictions, [[t] for t in targets])
  if name == "bleu4":
    return captions.bleu(predictions, [[t] for t in targets])[3]
  if name == "vqa_accuracy":  # one synthetic answer stands for all 10 annotators
    return vqa.mean_vqa_accuracy(predictions, [[t] * 10 for t in targets])
  if name == "iou@0.5":
    boxes = [grounding.first_box(t, box_format) for t in targets]
    return grounding.iou_accuracy(predictions, boxes, box_format)
  assert name == "accuracy", name  # closed set: the chosen candidate is the truth
  return float(np.mean([p == t for p, t in zip(predictions, targets)]))


def metric_fn(name: str, box_format: str = "") -> Callable:
  """A seqio-style metric function: fn(targets, predictions) -> {name: value}."""
  if name not in METRICS:
    raise ValueError(f"unknown metric {name!r}; expected one of {METRICS}")
  fn = lambda targets, predictions: {
      name: _metric_value(name, list(targets), list(predictions), box_format)}
  fn.__name__ = name
  return fn


def metric_fns(task: EvalTask) -> list[Callable]:
  names = task.metrics if task.kind == "generate" else ("accuracy",)
  return [metric_fn(name, task.box_format) for name in names]


def score(metrics, generated: list[str], truths: list[str], box_format: str = "") -> dict:
  out = {}
  for name in metrics:
    out.update(metric_fn(name, box_format)(truths, generated))
  return out


# ----------------------------------------------------------------------------------------
# Runner
# ----------------------------------------------------------------------------------------
def run(task: EvalTask, model, params, config, *, num_examples: int | None = None,
        batch_size: int = 8) -> tuple[dict, list[tuple[str, str]]]:
  data_config = config.data
  vocab = Vocab(data_config.vocab_path)
  examples = _examples(task, data_config, num_examples or task.num_examples)
  prompts = [heldout.as_prompt(e) for e, _ in examples]
  truths = [_text(vocab, answer, stop) for _, answer, stop in prompts]
  stop_id = prompts[0][2]
  if task.kind == "generate":
    generated = generate_texts(task, model, params, data_config, prompts, batch_size)
    return score(task.metrics, generated, truths, task.box_format), list(zip(truths, generated))
  suffix = data_config.get("suffix_length")
  inputs = [p for p, _, _ in prompts]
  if task.kind == "rank":
    labels = list(dict.fromkeys(truths))
    candidates = [vocab.encode(t) for t in labels]
    truth_index = [labels.index(t) for t in truths]
  elif task.kind == "zero_shot":
    labels = list(scenes.SHAPES)
    candidates = [vocab.encode(f"a photo of a {s}") for s in labels]
    truth_index = [labels.index(_single_shape(raw)) for _, raw in examples]
  else:
    raise ValueError(f"task {task.name!r}: unknown kind {task.kind!r}")
  log_likelihoods = scoring.rank_candidates(model, params, inputs, candidates, stop_id,
                                            suffix_length=suffix, batch_size=batch_size)
  predicted = np.argmax(log_likelihoods, axis=1)
  samples = [(labels[t], labels[p]) for t, p in zip(truth_index, predicted)]
  metrics = score(("accuracy",), [p for _, p in samples], [t for t, _ in samples])
  return dict(metrics, num_candidates=float(len(labels))), samples
