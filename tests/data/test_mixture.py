"""config.data.mixture as a list of sources (vlm_jax/data/mixture.py): the three ways to
write it, TFDS and seqio sources read as raw records, realised rates and loss weights, each
bad mixture as one line naming the field (vlm-train: exit 2, before compiling), and the
family templates that read real boxes."""
import json
import os

import numpy as np
import pytest

from vlm_jax import config as config_lib
from vlm_jax.cli import data as data_cli
from vlm_jax.cli import train as train_cli
from vlm_jax.data import catalog, health, ingest, mixture, pipeline
from vlm_jax.data.ingest import filters
from vlm_jax.data.sources import seqio_stream, tfds_source
from vlm_jax.data.vocab import Vocab

FLAMINGO = "configs/flamingo.py:tiny"
CAPTIONS, GROUNDING = "tfds:vlm_test_captions:1.0.0", "tfds:vlm_test_grounding:1.0.0"


def flamingo_data(user_data, value, **fields):
  data = config_lib.load_config(FLAMINGO).data
  data.tfds_data_dir, data.tasks_module = user_data.tfds, user_data.tasks_module
  data.mixture = value
  data.update(fields)
  return data


def test_three_ways_to_write_a_mixture_resolve_alike(user_data):
  compact = (f"{user_data.laion} rate=2 weight=0.2 name=laion; {user_data.mmc4} rate=1; "
             f"{CAPTIONS} rate=1 weight=0.5 split=train eval_split=validation")
  listed = [{"source": user_data.laion, "rate": 2, "loss_weight": 0.2, "name": "laion"},
            {"source": user_data.mmc4},
            {"source": CAPTIONS, "loss_weight": 0.5, "split": "train"}]
  resolved = [mixture.resolve(flamingo_data(user_data, value), "flamingo")
              for value in (compact, str(listed), tuple(listed))]
  assert resolved[0].tasks == resolved[1].tasks == resolved[2].tasks
  assert [(spec.name, spec.kind, spec.format, spec.template, spec.loss_weight, rate)
          for spec, rate in resolved[0].tasks] == [
              ("laion", "pairs", "arrayrecord", "document", 0.2, 2.0),
              ("mmc4", "interleaved", "arrayrecord", "document", 1.0, 1.0),
              ("vlm_test_captions", "pairs", "tfds", "document", 0.5, 1.0)]
  # A config file assigns the list itself; the command line parses the text safely.
  config = config_lib.load_config(FLAMINGO, [("data.mixture", str(listed))])
  assert config.data.mixture == listed


def test_a_catalog_mixture_in_a_list_shares_its_rate(data_config):
  data_config.mixture = "pretrain_simvlm rate=3; synthetic_text rate=1 weight=0.5 name=text"
  rates = {spec.name: (rate, spec.loss_weight)
           for spec, rate in mixture.resolve(data_config, "simvlm").tasks}
  assert rates == {"synthetic_pairs": (pytest.approx(2.4), 1.0),
                   "synthetic_text": (pytest.approx(0.6), 1.0), "text": (1.0, 0.5)}


def test_tfds_grounding_records_carry_their_boxes(user_data):
  source = tfds_source.TfdsSource("vlm_test_grounding:1.0.0", "validation", user_data.tfds)
  record = source[0]
  assert record["kind"] == "grounding" and isinstance(record["image"], bytes)
  assert record["objects"] and all(len(o["box"]) == 4 for o in record["objects"])
  x0, y0, x1, y1 = record["objects"][0]["box"]
  assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
  phrases = " ".join(o["phrase"] for o in record["objects"])
  assert all(word in record["text"] for word in phrases.split())


def test_a_seqio_stream_restarted_at_a_position_continues_the_same_records(user_data):
  """A tf.data-only seqio source on resume: a new reader replays the stream to the restored
  position and then yields exactly the records an uninterrupted reader yields."""
  spec, = [s for s, _ in mixture.resolve(flamingo_data(user_data, "user_captions"),
                                         "flamingo").tasks]
  straight = catalog.make_source(spec, "", "train", seed=7, shuffle=True)
  want = [straight[i]["text"] for i in range(650)]  # 192 examples per epoch, repeated
  in_order = catalog.make_source(spec, "", "train")
  assert len(in_order) == 192 and not in_order.shuffles_itself
  assert want[:50] != [in_order[i]["text"] for i in range(50)]  # seqio shuffled it
  resumed = catalog.make_source(spec, "", "train", seed=7, shuffle=True)
  assert [resumed[i]["text"] for i in range(600, 650)] == want[600:]
  assert resumed.replayed == 600 - resumed.window // 4  # read again, from the start


def test_realised_rates_and_loss_weights_per_example(user_data):
  data = flamingo_data(user_data, f"{user_data.laion} rate=3 weight=0.2 name=laion; "
                       f"{user_data.mmc4} rate=1 weight=1.5 name=mmc4")
  it = pipeline.make_train_iterator(data, "flamingo", global_batch_size=8, seed=0,
                                    process_index=0, process_count=1)
  weights = np.concatenate([next(it)["loss_weight"] for _ in range(25)])
  counts = pipeline.skipped_record_counts(it)
  assert counts["rate/laion"] == pytest.approx(0.75, abs=0.02)
  assert counts["rate/mmc4"] == pytest.approx(0.25, abs=0.02)
  assert sorted(set(weights.tolist())) == pytest.approx([0.2, 1.5])
  assert np.mean(weights == np.float32(0.2)) == pytest.approx(counts["rate/laion"])


def test_vlm_data_inspect_reports_realised_rates(user_data, capsys):
  data_cli.main(["inspect", f"{user_data.laion} rate=1; {CAPTIONS} rate=3 name=captions",
                 "--config", FLAMINGO, "--num", "2", "--mixture-examples", "400",
                 f"--config.data.tfds_data_dir={user_data.tfds}"])
  rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
          if line.startswith("  ")}
  assert float(rows["laion"][2]) == 0.25 and float(rows["captions"][2]) == 0.75
  assert abs(float(rows["captions"][-1]) - 0.75) < 0.02


# ----------------------------------------------------------------------------------------
# Bad mixtures: one line naming the field.
# ----------------------------------------------------------------------------------------
def _problem(user_data, value, family="flamingo", **fields):
  with pytest.raises(mixture.MixtureError) as error:
    mixture.check(flamingo_data(user_data, value, **fields), family)
  assert "\n" not in str(error.value)
  return str(error.value)


def test_each_bad_entry_names_its_field(user_data):
  laion = user_data.laion
  cases = {
      f"{laion} rte=1": "config.data.mixture[0]: unknown key(s) ['rte']; the keys are",
      f"{laion} rate=-1": "config.data.mixture[0].rate=-1.0: must be a number > 0",
      f"{laion} rate=many": "config.data.mixture[0].rate='many': must be a number > 0",
      f"{laion} weight=0": "config.data.mixture[0].loss_weight=0.0: must be a number > 0",
      f"{laion} kind=pairs": "config.data.mixture[0].kind: only TFDS datasets and seqio",
      f"{CAPTIONS} kind=video": "config.data.mixture[0].kind='video': expected one of",
      f"{laion} name=x; {user_data.mmc4} name=x": "config.data.mixture[1].name: two sources",
      "[{'rate': 1}]": "config.data.mixture[0].source=None: empty source",
      "[1, 2": "config.data.mixture='[1, 2': not a Python literal list of sources",
      "tfds:no_such_dataset": "config.data.mixture='tfds:no_such_dataset': no TFDS dataset",
      f"{CAPTIONS} split=test": "split 'test'",
      "user_pretrain name=mine": "config.data.mixture[0].name='mine': 'user_pretrain' holds 2",
      "user_captions split=test": "seqio task 'user_captions' has no split 'test'",
  }
  for value, start in cases.items():
    assert start in _problem(user_data, value), value


def test_a_tfrecord_tfds_dataset_must_be_read_through_seqio(user_data):
  message = _problem(user_data, CAPTIONS, tfds_data_dir=user_data.tfds_tfrecord)
  assert "is stored as tfrecord, which has no random access" in message


def test_a_tasks_module_that_fails_to_import_is_named(user_data, tmp_path):
  broken = tmp_path / "broken_tasks.py"
  broken.write_text("import seqio\nraise RuntimeError('no such bucket')\n")
  assert _problem(user_data, "anything", tasks_module=str(broken)) == (
      f"config.data.tasks_module={str(broken)!r}: importing it failed: RuntimeError: no such "
      "bucket")


@pytest.fixture(scope="module")
def empty_dir(user_data, tmp_path_factory):
  """An ingested directory whose filters removed every record."""
  path = str(tmp_path_factory.mktemp("empty") / "out")
  tars = os.path.join(user_data.laion, "..", "downloads", "synthetic", "pairs", "train", "*.tar")
  ingest.run("img2dataset", tars, path, filters=filters.Filters(min_caption_words=1000))
  return path


def _vlm_train(argv, capsys):
  with pytest.raises(SystemExit) as exit_info:
    train_cli.main(argv + ["--config", FLAMINGO, "--num-samples=0"])
  return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", ["unknown source", "empty source", "empty records",
                                  "non-positive rate", "template that does not fit"])
def test_vlm_train_rejects_a_bad_mixture_in_one_line_with_exit_2(case, user_data, empty_dir,
                                                                  tmp_path, capsys):
  value, message = {
      "unknown source": ("laion_typo rate=1", "config.data.mixture[0].source='laion_typo': "
                         "unknown source: not a task or mixture of this family"),
      "empty source": ("[{'source': ' ', 'rate': 1.0}]",
                       "config.data.mixture[0].source=' ': empty source; name a task"),
      "empty records": (f"{user_data.laion} rate=1; {empty_dir} rate=1",
                        f"config.data.mixture[1].source={empty_dir!r}: empty source: "
                        f"{empty_dir} holds no records"),
      "non-positive rate": (f"{user_data.laion} rate=0",
                            "config.data.mixture[0].rate=0.0: must be a number > 0"),
      "template that does not fit": (
          f"{user_data.laion} template=text",
          "config.data.mixture[0].template='text': task 'laion' holds 'pairs' records; the "
          "'flamingo' template 'text' takes text"),
  }[case]
  code, err = _vlm_train(["--workdir", str(tmp_path), f"--config.data.mixture={value}"],
                         capsys)
  assert code == train_cli.EXIT_CONFIG == 2
  assert err.startswith(f"vlm-train: error: {message}") and err.count("\n") == 1, err
  assert not os.listdir(tmp_path) or os.listdir(tmp_path) == ["config.json"]


def test_the_seqio_metric_functions_come_with_the_task(user_data):
  fns, post = seqio_stream.metric_functions("user_captions", user_data.tasks_module)
  assert [f.__name__ for f in fns] == ["exact"] and post("a b", True) == "a b"
  assert json.loads(json.dumps(fns[0](["a", "b"], ["a", "c"]))) == {"exact": 50.0}


# ----------------------------------------------------------------------------------------
# Templates for real data: boxes from the record, text-only Flamingo documents.
# ----------------------------------------------------------------------------------------
BOXED = {"kind": "grounding", "key": "k", "source": "s", "text": None,
         "image": np.full((40, 80, 3), 200, np.uint8),  # decoded pixels, as TFDS/seqio give
         "objects": [{"phrase": "the red circle", "box": [0.1, 0.2, 0.5, 0.6]}]}


def _turn(family, template, raw=BOXED):
  """(prompt text, answer text) of `raw` converted by the family's processor."""
  data = config_lib.load_config(f"configs/{family}.py:tiny").data
  spec = catalog.TaskSpec("real", "grounding", "tfds", "x", template=template)
  example = pipeline.make_processor(data, family, 0)(0, (spec, raw))
  vocab = Vocab(data.vocab_path)
  answer = example["loss_mask"] > 0
  prompt = (example["token_mask"] > 0) & ~np.roll(answer, 1)
  return vocab.decode(example["tokens"][prompt]), vocab.decode(example["targets"][answer])


def test_minigpt_v2_box_templates_read_the_record_s_boxes():
  box = "{<10><20><50><60>}"  # percent of the image's width and height
  prompt, answer = _turn("minigpt_v2", "refer")
  assert "[refer] Where is the red circle?" in prompt and answer == box
  prompt, answer = _turn("minigpt_v2", "identify")
  assert f"[identify] What is in {box}?" in prompt and answer == "the red circle"
  assert _turn("minigpt_v2", "detection")[1] == f"<p>the red circle</p>{box}"
  assert _turn("minigpt_v2", "grounding")[1] == f"<p>the red circle</p>{box}"


def test_cogagent_grounding_templates_read_the_record_s_boxes():
  box = "[[100,200,500,600]]"  # x1000, three digits
  prompt, answer = _turn("cogagent", "grounding")
  assert "Where is the red circle? Give its box." in prompt and answer == box
  prompt, answer = _turn("cogagent", "refer_gen")
  assert f"What is the element at {box}?" in prompt and answer == "the red circle"


def test_a_record_with_a_bad_box_is_skipped_not_trained():
  raw = dict(BOXED, objects=[{"phrase": "x", "box": [0.5, 0.2, 0.1, 0.6]}])
  data = config_lib.load_config("configs/minigpt_v2.py:tiny").data
  spec = catalog.TaskSpec("real", "grounding", "tfds", "x", template="refer")
  out = pipeline.make_processor(data, "minigpt_v2", 0)(0, (spec, raw))
  assert isinstance(out, health.Skipped) and "not (x0, y0, x1, y1) within [0, 1]" in out.reason
