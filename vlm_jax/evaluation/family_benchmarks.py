"""Benchmarks asked in a family's own prompt format: VQAv2 / OK-VQA style question
answering (`vlm-eval --vqa-questions Q --vqa-annotations A --vqa-images DIR`) and RefCOCO /
RefCOCO+ / RefCOCOg referring expressions (`vlm-eval --refcoco FILE --refcoco-images DIR`).

The family's data module declares the prompt (the hook `benchmark_example(kind, image,
text, data_config, vocab) -> (generation inputs, stop id)`, its `BENCHMARK_PROMPTS` and an
optional `benchmark_answer(kind, generated)` post-processing): MiniGPT-v2 asks `[vqa] ...`
in its chat template, Flamingo OpenFlamingo's `<image>Question:... Short answer:`. Answers
are generated greedily with the KV cache (`tasks.generate_texts`, through the distributed
decode in a multi-process job) and scored with the official VQA normalisation and soft
accuracy against every annotator's answer (`vqa.py`). Each referring expression (every
sentence of a RefCOCO record) asks for its box (MiniGPT-v2 `[refer] give me the location of
...`); the first box of the answer, read in the family's `BOX_FORMAT`, is a hit when its IoU
with the truth (converted to that format with the image's size) is at least 0.5. Unreadable
images and prompts that do not fit are skipped and counted.

Few-shot VQA (`vlm-eval --vqa-shots N [--vqa-shots-from Q A DIR]`, a family whose
`BENCHMARK_SHOTS` has 'vqa', i.e. Flamingo): each question is asked after N in-context
examples (`benchmark_example(..., shots=[(image, question, answer)])`) chosen by RICES as
OpenFlamingo's evaluate_vqa does: the N support questions whose images are nearest the
query's by the model's own vision features, shown with their first annotator's answer,
the most similar last.
"""
import collections
import io

from PIL import Image

from vlm_jax import storage
from vlm_jax.data import catalog, families, preprocessors
from vlm_jax.data.vocab import Vocab
from vlm_jax.evaluation import benchmarks, fewshot, grounding, heldout, tasks, vqa

VQA, REFER = "vqa", "refer"
REFCOCO = "refcoco"  # the task name of --refcoco's scalars (eval/refcoco/...)
MAX_NEW_TOKENS = {VQA: 10, REFER: 20}  # short answers; a box and its markup


def family_module(config, kind: str, shots: int = 0):
  """The family's data module, after checking that it has a `kind` benchmark prompt (with
  in-context examples when shots > 0)."""
  module = families.load(config.model.name)
  if kind not in getattr(module, "BENCHMARK_PROMPTS", {}):
    raise ValueError(f"the {config.model.name!r} family has no {kind!r} benchmark prompt "
                     "(BENCHMARK_PROMPTS and benchmark_example in its data module).")
  if shots and kind not in getattr(module, "BENCHMARK_SHOTS", ()):
    raise ValueError(f"the {config.model.name!r} family asks {kind!r} without in-context "
                     "examples (BENCHMARK_SHOTS in its data module); use 0 shots.")
  return module


def prompts(config, kind: str, pairs, shots=None) -> tuple[list, list, list]:
  """[(inputs, None, stop id)] for the usable (image path, text) pairs, their (index, image
  (width, height)), and the problems of the skipped ones. shots: per pair, its in-context
  examples [(image path or None: text only, text, answer)] (a family with `kind` in
  BENCHMARK_SHOTS), read with the pair."""
  module = family_module(config, kind)
  vocab = Vocab(config.data.vocab_path)
  out, kept, skipped = [], [], []
  for index, (image_path, text) in enumerate(pairs):
    try:
      image = storage.read_bytes(image_path)
      extra = {"shots": [(path and storage.read_bytes(path), text, answer)
                         for path, text, answer in shots[index]]} if shots else {}
      example, stop_id = module.benchmark_example(kind, image, text, config.data, vocab,
                                                  **extra)
    except OSError as e:
      skipped.append(f"{image_path}: {e.strerror or e}")
      continue
    except preprocessors.BadRecord as e:
      skipped.append(f"{image_path}: {e}")
      continue
    out.append(({k: v for k, v in example.items() if k not in heldout.DROP}, None, stop_id))
    kept.append((index, Image.open(io.BytesIO(image)).size))
  return out, kept, skipped


def answers(config, kind: str, model, params, prompt_triples, batch_size: int) -> list[str]:
  """Greedy answers, post-processed as the family's own evaluation does."""
  task = catalog.EvalTask(kind, "", max_new_tokens=MAX_NEW_TOKENS.get(kind, 24))
  generated = tasks.generate_texts(task, model, params, config.data, prompt_triples,
                                   batch_size)
  post = getattr(families.load(config.model.name), "benchmark_answer", None)
  return [post(kind, g) for g in generated] if post else generated


def few_shot_prompts(config, model, params, items, triples, kept, shots: int, pool=None,
                     batch_size: int = 8, text_only: bool = False):
  """The kept questions asked after `shots` in-context examples chosen by RICES (cosine of
  the model's vision features, `fewshot`) from `pool` (VqaItems; None: the benchmark itself,
  each question never its own example), each shown with its first annotator's answer and
  ordered as OpenFlamingo's evaluate_vqa, the most similar last; text_only: shown without
  their images (OpenFlamingo's "0-shot" protocol: 2 text-only demonstrations). Returns
  prompts' triple of lists, `kept` indexing items."""
  family_module(config, VQA, shots)
  features = lambda usable: fewshot.vision_features(
      model, params, fewshot.first_images(t[0] for t in usable), batch_size)
  itself = pool is None  # each question is then never its own example
  if itself:
    pool, pool_kept, pool_triples = items, kept, triples
  else:
    pool_triples, pool_kept, _ = prompts(config, VQA, [(i.image_path, i.question)
                                                       for i in pool])
  available = len(pool_kept) - itself
  if available < shots:
    raise ValueError(f"{shots} shots need {shots} usable support questions, the pool has "
                     f"{available}.")
  query_features = features(triples)
  pool_features = query_features if itself else features(pool_triples)
  chosen = []
  for q in range(len(kept)):
    support = fewshot.nearest(pool_features, query_features[q], shots,
                              exclude=q if itself else None)
    chosen.append([pool[pool_kept[i][0]] for i in reversed(support)])
  asked, again, skipped = prompts(
      config, VQA, [(items[i].image_path, items[i].question) for i, _ in kept],
      shots=[[(None if text_only else i.image_path, i.question, i.answers[0]) for i in row]
             for row in chosen])
  return asked, [kept[j] for j, _ in again], skipped


def evaluate_vqa(model, params, config, questions: str, annotations: str, image_dir: str, *,
                 image_prefix: str = "COCO_val2014_", num_examples: int = 0,
                 batch_size: int = 8, shots: int = 0, shots_from=None,
                 text_only_shots: bool = False):
  """({vqa_accuracy, questions, skipped, shots}, [(most common human answer, model's
  answer)]); `shots` in-context examples per question (`few_shot_prompts`) from the
  benchmark itself or from shots_from = (questions, annotations, image dir, image prefix),
  e.g. the train split, as OpenFlamingo; text_only_shots: shown without their images."""
  items = benchmarks.vqa_v2(questions, annotations, image_dir, image_prefix)
  if num_examples:
    items = items[:num_examples]
  triples, kept, skipped = prompts(config, VQA, [(i.image_path, i.question) for i in items])
  if triples and shots:
    pool = benchmarks.vqa_v2(*shots_from) if shots_from else None
    triples, kept, more = few_shot_prompts(config, model, params, items, triples, kept, shots,
                                           pool, batch_size, text_only_shots)
    skipped += more
  if not triples:
    raise ValueError(f"{questions}: none of {len(items)} questions could be used; first "
                     f"problems: {skipped[:3]}")
  generated = answers(config, VQA, model, params, triples, batch_size)
  humans = [items[i].answers for i, _ in kept]
  metrics = {"vqa_accuracy": vqa.mean_vqa_accuracy(generated, humans),
             "questions": float(len(triples)), "skipped": float(len(skipped)),
             "shots": float(shots)}
  common = [collections.Counter(h).most_common(1)[0][0] for h in humans]
  return metrics, list(zip(common, generated))


def evaluate_refcoco(model, params, config, path: str, image_dir: str, *,
                     num_examples: int = 0, batch_size: int = 8):
  """({iou@0.5, expressions, skipped}, [(truth box text, model's answer)]) over every
  sentence of the file's records (the first `num_examples` sentences, 0: all)."""
  box_format = families.box_format(config.model.name)
  if box_format is None:
    raise ValueError(f"the {config.model.name!r} family has no BOX_FORMAT to read boxes in.")
  queries = [(item, sentence) for item in benchmarks.refcoco(path, image_dir)
             for sentence in item.sentences]
  if num_examples:
    queries = queries[:num_examples]
  triples, kept, skipped = prompts(config, REFER, [(item.image_path, sentence)
                                                   for item, sentence in queries])
  if not triples:
    raise ValueError(f"{path}: none of {len(queries)} expressions could be used; first "
                     f"problems: {skipped[:3]}")
  generated = answers(config, REFER, model, params, triples, batch_size)
  truths = [box_format.normalise_box(queries[i][0].box, *size) for i, size in kept]
  metrics = {"iou@0.5": grounding.iou_accuracy(generated, truths, box_format),
             "expressions": float(len(triples)), "skipped": float(len(skipped))}
  return metrics, [(box_format.box_text(t), g) for t, g in zip(truths, generated)]
