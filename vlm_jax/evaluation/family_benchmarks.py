"""Benchmarks asked in a family's own prompt format: VQAv2 / OK-VQA style question
answering (`vlm-eval --vqa-questions Q --vqa-annotations A --vqa-images DIR`).

The family's data module declares the prompt (the hook `benchmark_example(kind, image,
text, data_config, vocab) -> (generation inputs, stop id)`, its `BENCHMARK_PROMPTS` and an
optional `benchmark_answer(kind, generated)` post-processing): MiniGPT-v2 asks `[vqa] ...`
in its chat template, Flamingo OpenFlamingo's `<image>Question:... Short answer:`. Answers
are generated greedily with the KV cache (`tasks.generate_texts`, through the distributed
decode in a multi-process job) and scored with the official VQA normalisation and soft
accuracy against every annotator's answer (`vqa.py`). Unreadable images and prompts that do
not fit are skipped and counted.
"""
import collections

from vlm_jax import storage
from vlm_jax.data import catalog, families, preprocessors
from vlm_jax.data.vocab import Vocab
from vlm_jax.evaluation import benchmarks, heldout, tasks, vqa

VQA = "vqa"
MAX_NEW_TOKENS = {VQA: 10}  # MiniGPT-v2's eval_vqa max_new_tokens; short answers


def family_module(config, kind: str):
  """The family's data module, after checking that it has a `kind` benchmark prompt."""
  module = families.load(config.model.name)
  if kind not in getattr(module, "BENCHMARK_PROMPTS", {}):
    raise ValueError(f"the {config.model.name!r} family has no {kind!r} benchmark prompt "
                     "(BENCHMARK_PROMPTS and benchmark_example in its data module).")
  return module


def prompts(config, kind: str, pairs) -> tuple[list, list, list]:
  """[(inputs, None, stop id)] for the usable (image path, text) pairs, their indices, and
  the problems of the skipped ones."""
  module = family_module(config, kind)
  vocab = Vocab(config.data.vocab_path)
  out, kept, skipped = [], [], []
  for index, (image_path, text) in enumerate(pairs):
    try:
      example, stop_id = module.benchmark_example(kind, storage.read_bytes(image_path), text,
                                                  config.data, vocab)
    except OSError as e:
      skipped.append(f"{image_path}: {e.strerror or e}")
      continue
    except preprocessors.BadRecord as e:
      skipped.append(f"{image_path}: {e}")
      continue
    out.append(({k: v for k, v in example.items() if k not in heldout.DROP}, None, stop_id))
    kept.append(index)
  return out, kept, skipped


def answers(config, kind: str, model, params, prompt_triples, batch_size: int) -> list[str]:
  """Greedy answers, post-processed as the family's own evaluation does."""
  task = catalog.EvalTask(kind, "", max_new_tokens=MAX_NEW_TOKENS.get(kind, 24))
  generated = tasks.generate_texts(task, model, params, config.data, prompt_triples,
                                   batch_size)
  post = getattr(families.load(config.model.name), "benchmark_answer", None)
  return [post(kind, g) for g in generated] if post else generated


def evaluate_vqa(model, params, config, questions: str, annotations: str, image_dir: str, *,
                 image_prefix: str = "COCO_val2014_", num_examples: int = 0,
                 batch_size: int = 8):
  """({vqa_accuracy, questions, skipped}, [(most common human answer, model's answer)])."""
  items = benchmarks.vqa_v2(questions, annotations, image_dir, image_prefix)
  if num_examples:
    items = items[:num_examples]
  triples, kept, skipped = prompts(config, VQA, [(i.image_path, i.question) for i in items])
  if not triples:
    raise ValueError(f"{questions}: none of {len(items)} questions could be used; first "
                     f"problems: {skipped[:3]}")
  generated = answers(config, VQA, model, params, triples, batch_size)
  humans = [items[i].answers for i in kept]
  metrics = {"vqa_accuracy": vqa.mean_vqa_accuracy(generated, humans),
             "questions": float(len(triples)), "skipped": float(len(skipped))}
  common = [collections.Counter(h).most_common(1)[0][0] for h in humans]
  return metrics, list(zip(common, generated))
