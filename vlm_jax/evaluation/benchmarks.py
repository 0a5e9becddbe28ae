"""Readers for real benchmark annotation files, from a path the user gives (no downloads).

    COCO captions   captions_*.json: {"images": [{"id", "file_name"}...],
                    "annotations": [{"image_id", "caption"}...]}
                    -> [CaptionItem(image_id, image_path, references)]
    VQAv2           v2_OpenEnded_*_questions.json {"questions": [{"question_id", "image_id",
                    "question"}]} + v2_mscoco_*_annotations.json {"annotations":
                    [{"question_id", "answers": [{"answer"}...], "multiple_choice_answer"}]}
                    -> [VqaItem(question_id, image_id, image_path, question, answers)]
    RefCOCO-style   a JSON list (or JSON lines) of {"image"|"file_name", "bbox" [x, y, w, h]
                    (COCO convention) or "box" [x0, y0, x1, y1], "sentences" [str] |
                    "sentence" str, optional "width"/"height"} -> [RefItem(image_path,
                    box x0 y0 x1 y1 in pixels, sentences)]

Image paths are joined to `image_dir` (COCO's `file_name`; VQAv2 uses COCO's naming
`COCO_<split>_<12-digit id>.jpg` when `image_prefix` is given). A missing key raises an
error naming the file and the record.
"""
import collections
import json
import os
from typing import NamedTuple

from vlm_jax import storage


class CaptionItem(NamedTuple):
  image_id: int
  image_path: str
  references: list


class VqaItem(NamedTuple):
  question_id: int
  image_id: int
  image_path: str
  question: str
  answers: list  # the annotators' answers (10 in VQAv2)


class RefItem(NamedTuple):
  image_path: str
  box: tuple  # x0, y0, x1, y1 pixels
  sentences: list


def _load(path):
  text = storage.read_text(path)
  try:
    return json.loads(text)
  except json.JSONDecodeError:  # JSON lines
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _field(record, key, path, index):
  if key not in record:
    raise ValueError(f"{path}: record {index} has no {key!r} (keys: {sorted(record)})")
  return record[key]


def coco_captions(path: str, image_dir: str = "") -> list[CaptionItem]:
  data = _load(path)
  refs = collections.defaultdict(list)
  for i, ann in enumerate(_field(data, "annotations", path, "top-level")):
    refs[_field(ann, "image_id", path, i)].append(_field(ann, "caption", path, i).strip())
  items = []
  for i, image in enumerate(_field(data, "images", path, "top-level")):
    image_id = _field(image, "id", path, i)
    if refs[image_id]:
      items.append(CaptionItem(image_id, os.path.join(image_dir, _field(image, "file_name",
                                                                       path, i)),
                               refs[image_id]))
  return items


def vqa_v2(questions_path: str, annotations_path: str, image_dir: str = "",
           image_prefix: str = "") -> list[VqaItem]:
  questions = _field(_load(questions_path), "questions", questions_path, "top-level")
  annotations = _field(_load(annotations_path), "annotations", annotations_path, "top-level")
  answers = {}
  for i, ann in enumerate(annotations):
    answers[_field(ann, "question_id", annotations_path, i)] = [
        _field(a, "answer", annotations_path, i) for a in _field(ann, "answers",
                                                                  annotations_path, i)]
  items = []
  for i, q in enumerate(questions):
    qid, image_id = _field(q, "question_id", questions_path, i), _field(q, "image_id",
                                                                          questions_path, i)
    if qid not in answers:
      raise ValueError(f"{annotations_path}: no annotation for question_id {qid}")
    name = f"{image_prefix}{image_id:012d}.jpg" if image_prefix else f"{image_id}.jpg"
    items.append(VqaItem(qid, image_id, os.path.join(image_dir, name),
                         _field(q, "question", questions_path, i), answers[qid]))
  return items


def refcoco(path: str, image_dir: str = "") -> list[RefItem]:
  items = []
  for i, r in enumerate(_load(path)):
    image = r.get("image", r.get("file_name"))
    if image is None:
      raise ValueError(f"{path}: record {i} has neither 'image' nor 'file_name'")
    if "bbox" in r:
      x, y, w, h = r["bbox"]
      box = (x, y, x + w, y + h)
    else:
      box = tuple(_field(r, "box", path, i))
    if len(box) != 4 or box[2] < box[0] or box[3] < box[1]:
      raise ValueError(f"{path}: record {i} has a malformed box {box!r}")
    sentences = r.get("sentences", [r["sentence"]] if "sentence" in r else None)
    if not sentences:
      raise ValueError(f"{path}: record {i} has no 'sentences' / 'sentence'")
    sentences = [s["sent"] if isinstance(s, dict) else s for s in sentences]
    items.append(RefItem(os.path.join(image_dir, image), tuple(float(v) for v in box),
                         sentences))
  return items
