"""Captioning on a COCO-format benchmark: the annotations json and the image directory are
paths the user gives (`vlm-eval --coco-captions FILE --image-dir DIR`).

Each image becomes a pair record (its first reference as the text) of the family's
captioning task (`captions=True` among its `EVAL_TASKS`; CogAgent has none), converted by
the family's own processor exactly as held-out data is, and captioned greedily with the KV
cache; CIDEr-D and BLEU-4 are computed against all of the image's references (CIDEr's idf
over the evaluated images). Unreadable images and records the processor rejects are skipped
and counted, never fatal one by one.

A family whose examples carry expert maps (Prismer with experts) gets them as training does
(`vlm-data experts`): `expert_labels` is a directory of labels computed by the experts
themselves, `<dir>/<expert>/<image file stem>.png` (+ `.json` naming a label map's ids), the
layout Prismer's expert scripts write; experts that run on images alone (edge) are computed.
An image without its labels is skipped and counted.
"""
import os

from vlm_jax import storage
from vlm_jax.data import health, preprocessors
from vlm_jax.data.ingest import labellers
from vlm_jax.evaluation import benchmarks, captions, heldout, tasks

TASK_NAME = "coco_captions"


def caption_task(config) -> tasks.EvalTask:
  for task in tasks.family_tasks(config).values():
    if task.captions:
      return task
  raise ValueError(f"the {config.model.name!r} family has no captioning task (captions=True "
                   "in its EVAL_TASKS), so it cannot caption a COCO benchmark.")


def _labeller(config, expert_labels: str):
  """Adds the config's expert maps to a pair record (None: the family reads no experts)."""
  names = tuple(config.data.get("experts", ()))
  if not names:
    return None
  return labellers.make(labellers.experts_spec(names, expert_labels))


def _examples(items, config, task, expert_labels=""):
  spec = heldout.task_spec(config, task.source)
  convert = heldout.processor(config)
  label = _labeller(config, expert_labels)
  out, skipped = [], []
  for index, item in enumerate(items):
    try:
      image = storage.read_bytes(item.image_path)
    except OSError as e:
      skipped.append(f"{item.image_path}: {e.strerror or e}")
      continue
    record = {"key": str(item.image_id), "image": image, "text": item.references[0]}
    if label:
      stem = os.path.splitext(os.path.basename(item.image_path))[0]
      try:
        labelled = label({"kind": "pairs", "key": stem, "image": image})
      except (preprocessors.BadRecord, OSError) as e:  # e.g. its labels are missing
        skipped.append(f"{item.image_path}: {e}")
        continue
      record.update(images=labelled["images"], experts=labelled["experts"])
    example = convert(index, (spec, record))
    if isinstance(example, health.Skipped):
      skipped.append(f"{item.image_path}: {example.reason}")
      continue
    out.append((heldout.as_prompt(example, convert.vocab.pad_id), item.references))
  return out, skipped


def evaluate(model, params, config, annotations: str, image_dir: str, *,
             num_examples: int = 0, batch_size: int = 8, expert_labels: str = ""):
  """({metric: value}, [(first reference, generated)]) over the benchmark's images (the
  first `num_examples`, 0: all); `expert_labels`: see the module docstring."""
  items = benchmarks.coco_captions(annotations, image_dir)
  if num_examples:
    items = items[:num_examples]
  task = caption_task(config)
  examples, skipped = _examples(items, config, task, expert_labels)
  if not examples:
    raise ValueError(f"{annotations}: none of {len(items)} images could be used; first "
                     f"problems: {skipped[:3]}")
  generated = tasks.generate_texts(task, model, params, config.data,
                                   [prompt for prompt, _ in examples], batch_size)
  references = [refs for _, refs in examples]
  metrics = {"cider": captions.cider(generated, references),
             "bleu4": captions.bleu(generated, references)[3],
             "images": float(len(examples)), "skipped": float(len(skipped))}
  return metrics, [(refs[0], g) for refs, g in zip(references, generated)]
