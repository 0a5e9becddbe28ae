"""Evaluation plumbing: benchmark readers on hand-written fixtures, prompts from held-out
examples, likelihood scoring vs cached decoding, few-shot prompts, vlm-eval on every family."""
import io
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from vlm_jax import config as config_lib
from vlm_jax import decode
from vlm_jax.cli import eval as eval_cli
import builders
from vlm_jax.data.families import flamingo as flamingo_data
from vlm_jax.data.synthetic import scenes
from vlm_jax.data.vocab import Vocab
from vlm_jax.evaluation import benchmarks, captions, fewshot, heldout, runner, scoring, tasks
from vlm_jax.evaluation import vqa
from vlm_jax.models import registry
from vlm_jax.train import loop

FIXTURES = os.path.join(os.path.dirname(__file__), "data", "benchmarks")
SHIPPED = Vocab()  # pad/eos/unk/bos 0/1/2/3


def test_coco_captions_reader():
  items = benchmarks.coco_captions(os.path.join(FIXTURES, "coco_captions.json"), "/img")
  assert [(i.image_id, i.image_path) for i in items] == [
      (7, "/img/COCO_val2014_000000000007.jpg"), (9, "/img/COCO_val2014_000000000009.jpg")]
  assert items[0].references == ["A cat on a mat.", "a cat"] and items[1].references == ["a dog"]


def test_vqa_v2_reader_and_soft_accuracy():
  items = benchmarks.vqa_v2(os.path.join(FIXTURES, "vqa_questions.json"),
                            os.path.join(FIXTURES, "vqa_annotations.json"), "/img",
                            image_prefix="COCO_val2014_")
  assert items[0].image_path == "/img/COCO_val2014_000000000007.jpg"
  assert items[0].question == "What animal is it?" and len(items[0].answers) == 10
  # 'kitten' is 2 of 10: leaving out a kitten (2 subsets) -> 1/3, else 2/3: 0.6.
  assert vqa.vqa_accuracy("kitten", items[0].answers) == pytest.approx(0.6)
  assert vqa.vqa_accuracy("one", items[1].answers) == pytest.approx(1.0)  # 4 x '1' ('one')


def test_refcoco_reader(tmp_path):
  items = benchmarks.refcoco(os.path.join(FIXTURES, "refcoco.jsonl"), "/img")
  assert items[0].box == (10, 20, 40, 60)  # COCO [x, y, w, h] -> corners
  assert items[0].sentences == ["the cat", "cat on the left"]
  assert items[1] == benchmarks.RefItem("/img/b.jpg", (0, 0, 50, 40), ["the dog"])
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps([{"image": "a.jpg", "box": [5, 5, 1, 1], "sentence": "x"}]))
  with pytest.raises(ValueError, match="record 0 has a malformed box"):
    benchmarks.refcoco(str(bad))


def test_prompt_is_the_example_without_its_last_answer():
  assert heldout.last_span(np.array([0, 0, 1, 1, 0, 1, 1, 0])) == (5, 7)
  example = {"tokens": np.array([3, 10, 11, 12, 13, 14, 0, 0]),
             "targets": np.array([10, 11, 12, 13, 14, 1, 0, 0]),
             "loss_mask": np.array([0, 0, 0, 1, 1, 1, 0, 0], np.float32),
             "token_mask": np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32),
             "loss_weight": np.float32(1)}
  inputs, answer, stop = heldout.as_prompt(example, SHIPPED.pad_id)  # 12 predicts 13
  np.testing.assert_array_equal(inputs["tokens"], [3, 10, 11, 12, 0, 0, 0, 0])
  np.testing.assert_array_equal(inputs["token_mask"], [1, 1, 1, 1, 0, 0, 0, 0])
  assert list(answer) == [13, 14, 1] and stop == 1 and "targets" not in inputs
  rebuilt = scoring.with_answer(inputs, [13, 14], 1, vocab=SHIPPED)
  for key in ("tokens", "loss_mask", "token_mask"):
    np.testing.assert_array_equal(rebuilt[key], example[key])
  on = example["loss_mask"] > 0  # prompt targets carry no loss and are not rebuilt
  np.testing.assert_array_equal(rebuilt["targets"][on], example["targets"][on])
  with pytest.raises(ValueError, match="does not fit"):
    scoring.with_answer(inputs, list(range(20, 26)), 1, vocab=SHIPPED)


def test_likelihood_of_the_greedy_caption_equals_its_cached_decoding_score():
  model = builders.build(
      "simvlm", lm=dict(vocab_size=64, width=32, num_heads=4, mlp_dim=48, encoder_layers=1,
                        decoder_layers=1, max_text_length=8),
      vision=dict(width=8, stage_blocks=(1, 1, 1)), dropout_rate=0.0, drop_path_rate=0.0)
  rng = np.random.default_rng(0)
  prompts = [{"images": rng.uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32),
              "image_mask": np.ones((1,), np.float32),
              "prefix_tokens": np.array([5, 6, 0], np.int32),
              "prefix_mask": np.array([1, 1, 0], np.float32)} for _ in range(2)]
  batch = heldout.stack(prompts)
  init = dict(batch, tokens=np.zeros((2, 6), np.int32), loss_mask=np.ones((2, 6)))
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), init))["params"]
  out = decode.generate(model, params, batch, 6, eos_id=-1)
  stop = int(out.tokens[0, -1])  # score the first 5 tokens + the 6th as the 'stop'
  ll = scoring.rank_candidates(model, params, prompts[:1], [list(np.asarray(out.tokens[0, :5]))],
                               stop, vocab=SHIPPED, suffix_length=6, batch_size=2)
  np.testing.assert_allclose(ll[0, 0], out.scores[0], rtol=1e-5, atol=1e-5)


def test_support_examples_are_seeded_distinct_and_exclude_the_query():
  picks = fewshot.choose_support(10, 3, 4, seed=1)
  assert picks == fewshot.choose_support(10, 3, 4, seed=1) and len(set(picks)) == 4
  assert 3 not in picks and picks != fewshot.choose_support(10, 3, 4, seed=2)
  with pytest.raises(ValueError, match="3 shots"):
    fewshot.choose_support(3, 0, 3, seed=0)
  features = np.array([[1.0, 0], [0.9, 0.1], [0, 1], [1, 0.05]])
  assert fewshot.nearest_support(features, 0, 2) == [3, 1]


def test_rices_support_is_the_nearest_by_the_model_s_vision_features():
  """Six images, each a slightly noisy copy of another's: with the tiny Flamingo's own
  (random) CLIP-layout tower, each query's first support is its twin, and the choices are
  the cosine-nearest by the tower's class token computed independently of fewshot.py."""
  config = config_lib.load_config("configs/flamingo.py:tiny")
  model = registry.build(config.model)
  rng = np.random.default_rng(0)
  size = config.data.image_size
  base = rng.uniform(-1, 1, (3, size, size, 3)).astype(np.float32)
  images = np.concatenate([base, base + rng.normal(0, 0.05, base.shape).astype(np.float32)])
  params = nn.unbox(model.init(jax.random.key(0), images[:1],
                               method=fewshot._pooled_vision_tokens))["params"]
  features = fewshot.vision_features(model, params, images, batch_size=4)
  want = np.asarray(model.vision.apply({"params": params["vision"]}, images))[:, 0]
  np.testing.assert_allclose(features, want, rtol=1e-4, atol=1e-5)
  unit = want / np.linalg.norm(want, axis=1, keepdims=True)
  similarity = unit @ unit.T - 2 * np.eye(6)  # the query itself never supports itself
  supports = fewshot.support_sets(6, 6, 2, "similar", features=features)
  assert supports == [list(np.argsort(-similarity[q], kind="stable")[:2]) for q in range(6)]
  assert [s[0] for s in supports] == [3, 4, 5, 0, 1, 2]
  assert fewshot.support_sets(5, 2, 2, "random", seed=5) == [
      fewshot.choose_support(5, q, 2, seed=5) for q in range(2)]
  with pytest.raises(ValueError, match="support='best'"):
    fewshot.support_sets(5, 2, 2, "best")
  with pytest.raises(ValueError, match="needs features of the 5 pool images"):
    fewshot.support_sets(5, 2, 2, "similar")


def test_few_shot_document_interleaves_support_then_query():
  config = config_lib.load_config("configs/flamingo.py:tiny")
  config.data.sequence_length, config.data.max_images, config.data.image_size = 96, 3, 32
  pool = [raw for _, raw in heldout.load_examples(config, "flamingo_pairs", 4)]
  record = fewshot.interleaved_record(pool, [2, 0], 1)
  spec = heldout.task_spec(config, "flamingo_pairs")
  example = heldout.processor(config)(0, (spec, record))
  assert example["image_mask"].tolist() == [1, 1, 1]
  vocab = heldout.processor(config).vocab
  inputs, answer, stop = heldout.as_prompt(example, vocab.pad_id)
  assert stop == vocab.token_id(flamingo_data.END_OF_CHUNK_TOKEN)
  assert vocab.decode(answer[:-1]) == scenes.caption(pool[1])
  # The prompt holds both support captions, and ends with the query's <image>.
  prompt = [int(t) for t in inputs["tokens"][inputs["token_mask"] > 0]]
  assert prompt[-1] == vocab.token_id(flamingo_data.IMAGE_TOKEN)
  text = vocab.decode([t for t in prompt if t > 5])
  assert scenes.caption(pool[2]) in text and scenes.caption(pool[0]) in text


def test_every_eval_task_is_a_seqio_task_with_the_runners_metrics():
  import seqio  # pylint: disable=g-import-not-at-top
  from vlm_jax.evaluation import seqio_tasks  # pylint: disable=g-import-not-at-top
  registered = set(seqio.TaskRegistry.names())
  every = {}
  for family in ("simvlm", "flamingo", "prismer", "cogagent", "minigpt_v2"):
    every.update(tasks.family_tasks(config_lib.load_config(f"configs/{family}.py:tiny")))
  assert {seqio_tasks.seqio_name(n) for n in every} <= registered
  for name in ("simvlm_rendered_text", "prismer_zero_shot_shapes"):
    task = seqio.get_mixture_or_task(seqio_tasks.seqio_name(name))
    texts = [ex["text_pretokenized"].decode() for ex in task.get_dataset(
        split="validation", sequence_length=None, shuffle=False).take(8).as_numpy_iterator()]
    keep = every[name].keep
    assert len(texts) == 8 and all(keep({"text": t}) for t in texts)
  # The registered metric functions are the runner's: exact match 1/2; VQA normalises "two".
  vqa_task = seqio.get_mixture_or_task(seqio_tasks.seqio_name("minigpt_v2_vqa"))
  merged = {}
  for fn in vqa_task.metric_fns:
    merged.update(fn(["two", "red"], ["2", "blue"]))
  assert merged == {"exact_match": 0.0, "vqa_accuracy": 0.5}
  assert merged == tasks.score(("exact_match", "vqa_accuracy"), ["2", "blue"], ["two", "red"])
  rank = seqio.get_mixture_or_task(seqio_tasks.seqio_name("prismer_rank_captions"))
  assert [fn(["a", "b"], ["a", "c"]) for fn in rank.metric_fns] == [{"accuracy": 0.5}]


def test_vlm_eval_captions_a_coco_format_benchmark(tmp_path, capsys):
  """The fixture's image 7 is a real JPEG, image 9 is corrupt (skipped and counted), image 11
  has no captions (not an item). CIDEr is over both of image 7's references."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(np.full((40, 56, 3), (200, 30, 30), np.uint8)).save(
      tmp_path / "COCO_val2014_000000000007.jpg")
  (tmp_path / "COCO_val2014_000000000009.jpg").write_bytes(b"not a jpeg")
  workdir = tmp_path / "run"
  eval_cli.main(["--config=configs/simvlm.py:tiny", "--workdir", str(workdir), "--random-init",
                 "--coco-captions", os.path.join(FIXTURES, "coco_captions.json"),
                 "--image-dir", str(tmp_path), "--num-samples", "1"])
  printed = capsys.readouterr().out
  with open(workdir / "metrics.jsonl") as f:
    written = json.loads(f.readlines()[-1])
  assert written["eval/coco_captions/images"] == 1
  assert written["eval/coco_captions/skipped"] == 1
  generated = printed.split("model: ")[1].splitlines()[0].strip("'")
  want = captions.cider([generated], [["A cat on a mat.", "a cat"]])
  assert written["eval/coco_captions/cider"] == pytest.approx(want)
  with pytest.raises(SystemExit):  # CogAgent has no captioning task: a clear usage error
    eval_cli.main(["--config=configs/cogagent.py:tiny", "--workdir", str(workdir),
                   "--random-init", "--coco-captions", "x.json"])
  assert "no captioning task" in capsys.readouterr().err


def test_unknown_or_another_family_s_tasks_raise():
  config = config_lib.load_config("configs/simvlm.py:tiny")
  with pytest.raises(ValueError, match="unknown evaluation task 'coco_karpathy'"):
    tasks.get("coco_karpathy", config)
  with pytest.raises(ValueError, match="'cogagent_ocr' for the 'simvlm' family; its tasks"):
    tasks.get("cogagent_ocr", config)


def _train_with_evals(workdir):
  """4 steps of tiny SimVLM with config.evals every 2 steps; returns the metric rows."""
  config = config_lib.load_config("configs/simvlm.py:tiny", [
      ("batch_size", "8"), ("num_train_steps", "4"), ("log_every_steps", "2"),
      ("checkpoint.every_steps", "4"), ("evals.every_steps", "2"),
      ("evals.tasks", "['simvlm_rank_captions', 'simvlm_scenes']"),
      ("evals.num_examples", "2"), ("evals.batch_size", "2")])
  loop.train(config, str(workdir))
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


@pytest.mark.parametrize("family", ["simvlm", "prismer", "minigpt_v2", "cogagent", "flamingo"])
def test_vlm_eval_runs_every_task_of_every_family(family, tmp_path, capsys):
  """SimVLM: config.evals during training, then vlm-eval on the newest checkpoint; the other
  families: vlm-eval on freshly initialised weights."""
  step, flags = 0, ["--random-init"]
  if family == "simvlm":
    rows = _train_with_evals(tmp_path)
    evals = [r for r in rows if "eval/simvlm_scenes/cider" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(0 <= r["eval/simvlm_rank_captions/accuracy"] <= 1 for r in evals)
    step, flags = 4, []
  eval_cli.main([f"--config=configs/{family}.py:tiny", "--workdir", str(tmp_path),
                 "--num-examples", "2", "--batch-size", "2", "--num-samples", "1"] + flags)
  printed = capsys.readouterr().out
  with open(tmp_path / "metrics.jsonl") as f:
    written = json.loads(f.readlines()[-1])
  config = config_lib.load_config(f"configs/{family}.py:tiny", [])
  names = tasks.tasks_for(config)
  assert names and written["step"] == step
  for name in names:
    assert f"{name} (step {step}):" in printed
    metrics = [k for k in written if k.startswith(f"eval/{name}/") and not k.endswith("seconds")]
    scores = [k for k in metrics if not k.endswith("log_likelihood")]
    assert scores and all(0.0 <= written[k] <= 100.0 for k in scores)
    assert all(written[k] < 0.0 for k in metrics if k.endswith("log_likelihood"))
  with pytest.raises(ValueError, match="unknown evaluation task"):
    runner.task_names(config, ["nope"])

