"""Benchmarks in a family's own prompt format (evaluation/family_benchmarks.py): the exact
prompt each family builds for a VQAv2 question / referring expression, and `vlm-eval
--vqa-questions` / `--refcoco` end to end on the shipped fixtures (tests/data/benchmarks:
VQAv2-layout questions, annotations and images; RefCOCO-style records and images), in one
process and as a 2-process `vlm-launch local --program eval` job; and RICES few-shot support
selection as a 2-process job."""
import ast
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from vlm_jax import config as config_lib
from vlm_jax.cli import eval as eval_cli
from vlm_jax.data import preprocessors
from vlm_jax.data.families import cogagent as cogagent_data
from vlm_jax.data.families import flamingo as flamingo_data
from vlm_jax.data.families import minigpt_v2 as minigpt_data
from vlm_jax.data.vocab import BOS_ID, EOS_ID, Vocab
from vlm_jax.data.boxes import percent, permille
from vlm_jax.evaluation import benchmarks, family_benchmarks, grounding, vqa
from vlm_jax.models import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "data", "benchmarks")
VQA_ARGS = ["--vqa-questions", os.path.join(FIXTURES, "vqa_questions.json"),
            "--vqa-annotations", os.path.join(FIXTURES, "vqa_annotations.json"),
            "--vqa-images", os.path.join(FIXTURES, "vqa_images")]
# The fixture's questions and their annotators' answers, in file order.
HUMANS = [["cat"] * 3 + ["kitten"] + ["cat"] * 4 + ["kitten", "cat"],
          ["1", "one", "2", "1", "1"] + ["2"] * 5]


def _image():
  with open(os.path.join(FIXTURES, "vqa_images", "COCO_val2014_000000000007.jpg"), "rb") as f:
    return f.read()


def _prompt_ids(example):
  return [int(t) for t, m in zip(example["tokens"], example["token_mask"]) if m]


def test_minigpt_v2_asks_vqa_in_its_chat_template_with_its_task_identifier():
  config = config_lib.load_config("configs/minigpt_v2.py:tiny")
  vocab = Vocab(config.data.vocab_path)
  text = minigpt_data.benchmark_prompt("vqa", "What animal is it?")
  assert text == ("[vqa] Based on the image, respond to this question with a short answer: "
                  "What animal is it?")
  example, stop = minigpt_data.benchmark_example("vqa", _image(), "What animal is it?",
                                                 config.data, vocab)
  slots = [minigpt_data.placeholder_id(vocab)] * config.data.image_tokens
  assert _prompt_ids(example) == ([BOS_ID] + vocab.encode("[INST] <Img>") + slots +
                                  vocab.encode("</Img> " + text + " [/INST]"))
  assert stop == EOS_ID
  assert example["images"].shape == (1, config.data.image_size, config.data.image_size, 3)
  assert example["image_positions"][0] == 1 + len(vocab.encode("[INST] <Img>"))


def test_flamingo_asks_vqa_as_openflamingo_and_stops_at_the_end_of_chunk():
  config = config_lib.load_config("configs/flamingo.py:tiny")
  vocab = Vocab(config.data.vocab_path)
  example, stop = flamingo_data.benchmark_example("vqa", _image(), "How many dogs?",
                                                  config.data, vocab)
  image_id = vocab.token_id(flamingo_data.IMAGE_TOKEN)
  assert _prompt_ids(example) == [BOS_ID, image_id] + vocab.encode(
      "Question:How many dogs? Short answer:")
  assert stop == vocab.token_id(flamingo_data.END_OF_CHUNK_TOKEN)
  assert example["image_mask"].tolist() == [1.0] + [0.0] * (config.data.max_images - 1)
  assert example["image_positions"][0] == 1
  assert np.abs(example["images"][0]).sum() > 0 and not example["images"][1:].any()
  # OpenFlamingo's post-processing of a generation that runs on into the next question.
  assert flamingo_data.benchmark_answer("vqa", "two dogs, one cat Question:what") == "two dogs"


def _printed_answers(out: str) -> list[str]:
  return [ast.literal_eval(line.split("model: ", 1)[1]) for line in out.splitlines()
          if "model: " in line]


def test_vlm_eval_scores_minigpt_v2_s_generations_with_vqa_accuracy(tmp_path, capsys):
  workdir = tmp_path / "run"
  eval_cli.main(["--config=configs/minigpt_v2.py:tiny", "--workdir", str(workdir),
                 "--random-init", *VQA_ARGS])
  printed = capsys.readouterr().out
  assert "vqa (step 0): vqa_accuracy" in printed
  with open(workdir / "metrics.jsonl") as f:
    written = json.loads(f.readlines()[-1])
  assert written["eval/vqa/questions"] == 2 and written["eval/vqa/skipped"] == 0
  generated = _printed_answers(printed)
  assert len(generated) == 2
  assert written["eval/vqa/vqa_accuracy"] == pytest.approx(
      vqa.mean_vqa_accuracy(generated, HUMANS))


def test_bad_benchmark_flags_and_families_without_the_prompt_are_usage_errors(tmp_path, capsys):
  for args in (["--config=configs/minigpt_v2.py:tiny", "--vqa-questions", "q.json"],
               ["--config=configs/simvlm.py:tiny", *VQA_ARGS],
               ["--config=configs/minigpt_v2.py:tiny", "--coco-captions", "c.json",
                *VQA_ARGS],
               ["--config=configs/flamingo.py:tiny", "--refcoco", "r.json"]):
    with pytest.raises(SystemExit):
      eval_cli.main([*args, "--workdir", str(tmp_path), "--random-init"])
  err = capsys.readouterr().err
  assert "--vqa-questions and --vqa-annotations go together" in err
  assert "the 'simvlm' family has no 'vqa' benchmark prompt" in err
  assert "pass one of --task, --coco-captions, --vqa-questions, --refcoco" in err
  assert "the 'flamingo' family has no 'refer' benchmark prompt" in err
  config = config_lib.load_config("configs/minigpt_v2.py:tiny")
  with pytest.raises(ValueError, match="none of 2 questions could be used"):  # no images
    family_benchmarks.evaluate_vqa(None, None, config, VQA_ARGS[1], VQA_ARGS[3], str(tmp_path))


def test_flamingo_few_shot_vqa_as_a_two_process_vlm_launch_job(tmp_path):
  """One RICES shot per question (the other one): the support features are computed
  through distributed.jit in both processes."""
  done = subprocess.run(
      [sys.executable, "-m", "vlm_jax.cli.launch", "local", "--num-processes", "2",
       "--cpu-devices-per-process", "1", "--program", "eval",
       "--config", "configs/flamingo.py:tiny", "--workdir", str(tmp_path / "run"),
       "--random-init", *VQA_ARGS, "--vqa-shots", "1"],
      capture_output=True, text=True, timeout=600, cwd=REPO,
      env={**os.environ, "PYTHONPATH": REPO})
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert done.stdout.count("vqa (step 0)") == 1, done.stdout[-3000:]
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    written = json.loads(f.readlines()[-1])
  assert written["eval/vqa/questions"] == 2 and written["eval/vqa/shots"] == 1
  generated = _printed_answers(done.stdout)
  assert written["eval/vqa/vqa_accuracy"] == pytest.approx(
      vqa.mean_vqa_accuracy(generated, HUMANS))


REFCOCO_ARGS = ["--refcoco", os.path.join(FIXTURES, "refcoco.jsonl"),
                "--refcoco-images", os.path.join(FIXTURES, "refcoco_images")]


def test_minigpt_v2_asks_refcoco_with_refer_and_scores_its_boxes_by_iou(tmp_path, capsys):
  config = config_lib.load_config("configs/minigpt_v2.py:tiny")
  vocab = Vocab(config.data.vocab_path)
  example, _ = minigpt_data.benchmark_example("refer", _image(), "the cat", config.data, vocab)
  asked = vocab.encode("</Img> [refer] give me the location of the cat [/INST]")
  assert _prompt_ids(example)[-len(asked):] == asked
  workdir = tmp_path / "run"
  eval_cli.main(["--config=configs/minigpt_v2.py:tiny", "--workdir", str(workdir),
                 "--random-init", *REFCOCO_ARGS])
  printed = capsys.readouterr().out
  with open(workdir / "metrics.jsonl") as f:
    written = json.loads(f.readlines()[-1])
  # Three expressions (two sentences of record 0, one of record 1), images 100x80 pixels.
  assert written["eval/refcoco/expressions"] == 3 and written["eval/refcoco/skipped"] == 0
  truths = [(10, 25, 40, 75)] * 2 + [(0, 0, 50, 50)]  # the fixture's boxes in 0..100
  assert [line.split("truth: ")[1] for line in printed.splitlines() if "truth: " in line] == [
      repr(percent.box_text(t)) for t in truths]
  generated = _printed_answers(printed)
  assert written["eval/refcoco/iou@0.5"] == pytest.approx(
      grounding.iou_accuracy(generated, truths, percent))
  # The metric itself: the truth's own box text is a hit, a box beside it a miss.
  assert grounding.iou_accuracy([percent.box_text(truths[0]), "{<60><0><99><20>}"],
                                truths[:2], percent) == 0.5


def test_rices_few_shot_task_as_a_two_process_vlm_launch_job(tmp_path):
  """The support images' vision features are computed through distributed.jit in both
  processes (tests/test_evaluation.py checks which supports they choose)."""
  done = subprocess.run(
      [sys.executable, "-m", "vlm_jax.cli.launch", "local", "--num-processes", "2",
       "--cpu-devices-per-process", "1", "--program", "eval",
       "--config", "configs/flamingo.py:tiny", "--workdir", str(tmp_path / "run"),
       "--random-init", "--task", "flamingo_captions_2shot_similar", "--num-examples", "4"],
      capture_output=True, text=True, timeout=600, cwd=REPO,
      env={**os.environ, "PYTHONPATH": REPO})
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert done.stdout.count("flamingo_captions_2shot_similar (step 0)") == 1, done.stdout[-3000:]
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    written = json.loads(f.readlines()[-1])
  assert {"cider", "bleu4", "exact_match"} <= {
      k.split("/")[-1] for k in written if k.startswith("eval/flamingo_captions_2shot_similar/")}


def test_cogagent_asks_refcoco_in_its_template_and_reads_permille_boxes(tmp_path, capsys):
  config = config_lib.load_config("configs/cogagent.py:tiny")
  vocab = Vocab(config.data.vocab_path)
  example, stop = cogagent_data.benchmark_example("refer", _image(), "the cat", config.data,
                                                  vocab)
  assert _prompt_ids(example) == [BOS_ID] + [vocab.placeholder_id] * (
      config.data.image_tokens) + vocab.encode(
          "Question: Where is the cat? answer in [[x0,y0,x1,y1]] format. Answer:")
  assert stop == EOS_ID and example["high_res_images"].shape[1] == config.data.high_res_image_size
  example, _ = cogagent_data.benchmark_example("vqa", _image(), "How many dogs?", config.data,
                                               vocab)
  assert _prompt_ids(example)[config.data.image_tokens + 1:] == vocab.encode(
      "Question: How many dogs? Answer:")
  workdir = tmp_path / "run"
  eval_cli.main(["--config=configs/cogagent.py:tiny", "--workdir", str(workdir),
                 "--random-init", *REFCOCO_ARGS])
  printed = capsys.readouterr().out
  with open(workdir / "metrics.jsonl") as f:
    written = json.loads(f.readlines()[-1])
  assert written["eval/refcoco/expressions"] == 3
  truths = [(100, 250, 400, 750)] * 2 + [(0, 0, 500, 500)]  # the fixture's boxes in 0..999
  assert [line.split("truth: ")[1] for line in printed.splitlines() if "truth: " in line] == [
      repr(permille.box_text(t)) for t in truths]
  assert written["eval/refcoco/iou@0.5"] == pytest.approx(
      grounding.iou_accuracy(_printed_answers(printed), truths, permille))


# ----------------------------------------------------------------------------------------
# Few-shot VQA (Flamingo, OpenFlamingo's evaluate_vqa prompt, RICES supports)
# ----------------------------------------------------------------------------------------
def _image_9():
  with open(os.path.join(FIXTURES, "vqa_images", "COCO_val2014_000000000009.jpg"), "rb") as f:
    return f.read()


def test_flamingo_two_shot_vqa_prompt_is_openflamingo_s_demos_then_the_query():
  """OpenFlamingo: "".join(get_vqa_prompt(q, a) + "\n" for each demo) + get_vqa_prompt(q),
  get_vqa_prompt = f"<image>Question:{q} Short answer:{a}<|endofchunk|>"; after BOS."""
  config = config_lib.load_config("configs/flamingo.py:tiny")
  vocab = Vocab(config.data.vocab_path)
  shots = [(_image_9(), "How many dogs?", "1"), (_image(), "What animal is it?", "cat")]
  example, stop = flamingo_data.benchmark_example("vqa", _image(), "What color is it?",
                                                  config.data, vocab, shots=shots)
  image_id = vocab.token_id(flamingo_data.IMAGE_TOKEN)
  chunk_id = vocab.token_id(flamingo_data.END_OF_CHUNK_TOKEN)
  newline = vocab.encode("\n")  # [] in the sample SentencePiece model (it folds whitespace)
  want = ([BOS_ID, image_id] + vocab.encode("Question:How many dogs? Short answer:1") +
          [chunk_id] + newline + [image_id] +
          vocab.encode("Question:What animal is it? Short answer:cat") + [chunk_id] +
          newline + [image_id] + vocab.encode("Question:What color is it? Short answer:"))
  assert _prompt_ids(example) == want and stop == chunk_id
  assert example["image_positions"][:3].tolist() == [
      i for i, t in enumerate(want) if t == image_id]
  assert example["image_mask"].tolist() == [1.0, 1.0, 1.0, 0.0]
  zero_shot, _ = flamingo_data.benchmark_example("vqa", _image(), "x", config.data, vocab)
  np.testing.assert_array_equal(example["images"][2], zero_shot["images"][0])  # the query
  np.testing.assert_array_equal(example["images"][1], zero_shot["images"][0])
  assert np.abs(example["images"][0] - example["images"][1]).max() > 0.1  # image 9
  with pytest.raises(preprocessors.BadRecord, match="4 shots and the query need 5 images"):
    flamingo_data.benchmark_example("vqa", _image(), "x", config.data, vocab, shots=shots * 2)
  # OpenFlamingo's "0-shot" rows: the demonstrations' text with "<image>" removed.
  text_only = [(None, q, a) for _, q, a in shots]
  example, _ = flamingo_data.benchmark_example("vqa", _image(), "What color is it?",
                                               config.data, vocab, shots=text_only)
  assert _prompt_ids(example) == (
      [BOS_ID] + vocab.encode("Question:How many dogs? Short answer:1") + [chunk_id] +
      newline + vocab.encode("Question:What animal is it? Short answer:cat") + [chunk_id] +
      newline + [image_id] + vocab.encode("Question:What color is it? Short answer:"))
  assert example["image_mask"].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_rices_few_shot_vqa_shows_the_nearest_supports_most_similar_last(tmp_path, capsys):
  """The pool is the benchmark itself (as --vqa-shots-from its own files, so each question's
  own image is the nearest): the second support shown is the query's own question with its
  first annotator's answer. `vlm-eval --vqa-shots 1` runs end to end after an OpenFlamingo
  import in tests/test_released_end_to_end.py."""
  config = config_lib.load_config("configs/flamingo.py:tiny")
  model = registry.build(config.model)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0),
                                        registry.dummy_batch(config, 1)))["params"]
  items = benchmarks.vqa_v2(*VQA_ARGS[1:6:2], "COCO_val2014_")
  triples, kept, _ = family_benchmarks.prompts(config, "vqa", [(i.image_path, i.question)
                                                               for i in items])
  asked, kept2, skipped = family_benchmarks.few_shot_prompts(
      config, model, params, items, triples, kept, 2, pool=items, batch_size=2)
  assert [i for i, _ in kept2] == [0, 1] and not skipped
  vocab = Vocab(config.data.vocab_path)
  for (inputs, _, _), query, other in zip(asked, items, items[::-1]):
    ids = [int(t) for t, m in zip(inputs["tokens"], inputs["token_mask"]) if m]
    shown = vocab.decode(ids)
    own = f"Question:{query.question} Short answer:{query.answers[0]}"
    assert shown.index(f"Question:{other.question}") < shown.index(own), shown
  text_only, _, _ = family_benchmarks.few_shot_prompts(
      config, model, params, items, triples, kept, 1, batch_size=2, text_only=True)
  for (inputs, _, _), query, other in zip(text_only, items, items[::-1]):
    ids = [int(t) for t, m in zip(inputs["tokens"], inputs["token_mask"]) if m]
    assert inputs["image_mask"].sum() == 1  # the query's image only
    assert vocab.decode(ids).startswith(f"Question:{other.question} Short answer:"
                                        f"{other.answers[0]}")
  with pytest.raises(ValueError, match="2 shots need 2 usable support questions, the pool"):
    family_benchmarks.few_shot_prompts(config, model, params, items, triples, kept, 2)
  for args in (["--config=configs/minigpt_v2.py:tiny", *VQA_ARGS, "--vqa-shots", "2"],
               ["--config=configs/flamingo.py:tiny", "--vqa-shots", "2"]):
    with pytest.raises(SystemExit):
      eval_cli.main([*args, "--workdir", str(tmp_path), "--random-init"])
  err = capsys.readouterr().err
  assert "the 'minigpt_v2' family asks 'vqa' without in-context" in err
  assert "--vqa-shots and --vqa-shots-from need --vqa-questions" in err
