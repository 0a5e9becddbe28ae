"""MiniGPT-v2: token grouping, splicing, padding, freezing, configs; boxes, template, data."""
import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

import builders
from vlm_jax import config as config_lib
from vlm_jax import params as state_lib
from vlm_jax import decode as decode_lib
from vlm_jax import flops
from vlm_jax.data import catalog, health, preprocessors
from vlm_jax.data.boxes import percent as boxes
from vlm_jax.data.families import minigpt_v2 as data_lib
from vlm_jax.data.synthetic import scene_objects, scenes
from vlm_jax.data.vocab import EOS_ID, Vocab
from vlm_jax.models import minigpt_v2 as model_lib
from vlm_jax.models import registry
from vlm_jax.train import step as step_lib

VOCAB, WIDTH, VISION_WIDTH = 64, 32, 16
TINY = dict(lm=dict(vocab_size=VOCAB, width=WIDTH, num_layers=2, num_heads=4, mlp_dim=48,
                    lora_targets=("query", "value"), lora_rank=4),
            vision=dict(width=VISION_WIDTH, depth=1, num_heads=2, mlp_dim=32, patch_size=14,
                        class_token=True),
            group_size=4)
IMAGE, LENGTH = 56, 16
TASKS = catalog.tasks(data_lib)  # 4x4 patches -> 4 LM visual tokens


def _batch(length=LENGTH, seed=0, valid=12):
  k1, k2 = jax.random.split(jax.random.key(seed))
  tokens = jax.random.randint(k1, (2, length), 4, 64)
  token_mask = (jnp.arange(length) < valid).astype(jnp.float32)[None].repeat(2, 0)
  return {"images": jax.random.uniform(k2, (2, 1, IMAGE, IMAGE, 3), minval=-1, maxval=1),
          "image_mask": jnp.ones((2, 1)), "tokens": tokens, "token_mask": token_mask,
          "image_positions": jnp.array([[2], [3]], jnp.int32)}


@pytest.fixture(scope="module")
def tiny():
  model = builders.build("minigpt_v2", **TINY)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), _batch()))["params"]
  return model, params


# ----------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------
def test_grouping_concatenates_consecutive_raster_tokens():
  x = jnp.stack([jnp.arange(16), 100 + jnp.arange(16)], axis=-1)[None]  # token p = [p, 100+p]
  out = model_lib.group_consecutive_tokens(x, 4)
  assert out.shape == (1, 4, 8)
  np.testing.assert_array_equal(out[0, 1], [4, 104, 5, 105, 6, 106, 7, 107])
  # 32x32 grid: LM token j = row j // 8, columns 4 (j % 8) .. +3 (1x4 strips, not 2x2 blocks)
  rows, cols = jnp.meshgrid(jnp.arange(32), jnp.arange(32), indexing="ij")
  grid = jnp.stack([rows, cols], axis=-1).reshape(1, 1024, 2)
  out = model_lib.group_consecutive_tokens(grid, 4).reshape(256, 4, 2)
  for j in (0, 9, 255):
    np.testing.assert_array_equal(out[j, :, 0], [j // 8] * 4)
    np.testing.assert_array_equal(out[j, :, 1], 4 * (j % 8) + jnp.arange(4))


def test_448px_gives_1024_vit_tokens_and_256_lm_tokens():
  model = builders.build("minigpt_v2", **TINY)
  images = jax.ShapeDtypeStruct((2, 1, 448, 448, 3), jnp.float32)
  out = jax.eval_shape(lambda im: model.init_with_output(
      jax.random.key(0), im, method="encode_images")[0], images)
  assert out.shape == (2, 1, 256, WIDTH)
  variables = jax.eval_shape(
      lambda im: model.init(jax.random.key(0), im, method="encode_images"), images)
  pos = nn.unbox(variables)["params"]["vision"]["pos_embedding"]["pos_embedding"]
  assert pos.shape == (1 + 1024, VISION_WIDTH)  # class token + 32x32 patches
  kernel = nn.unbox(variables)["params"]["projection"]["kernel"]
  assert kernel.shape == (4 * VISION_WIDTH, WIDTH)


def test_model_projects_groups_of_its_vit_tokens(tiny):
  model, params = tiny
  images = _batch()["images"]
  visual = model.apply({"params": params}, images, method="encode_images")
  vit_out = model.apply({"params": params}, images[:, 0], method=lambda m, x: m.vision(x))
  proj = params["projection"]
  expected = model_lib.group_consecutive_tokens(vit_out[:, 1:], 4) @ proj["kernel"] + proj["bias"]
  np.testing.assert_allclose(visual[:, 0], expected, atol=1e-5)


def test_visual_tokens_are_spliced_at_image_positions(tiny):
  model, params = tiny
  batch = dict(_batch(), image_mask=jnp.array([[1.0], [0.0]]))
  x, _, _ = model.apply({"params": params}, batch, method="embed_inputs")
  visual = model.apply({"params": params}, batch["images"], method="encode_images")
  text = model.apply({"params": params}, batch["tokens"], method=lambda m, t: m.lm.embed(t))
  np.testing.assert_allclose(x[0, 2:6], visual[0, 0], atol=1e-6)
  np.testing.assert_allclose(x[0, :2], text[0, :2])
  np.testing.assert_allclose(x[0, 6:], text[0, 6:])
  np.testing.assert_allclose(x[1], text[1])  # image_mask 0: nothing spliced


def test_logits_at_text_positions_do_not_depend_on_padding(tiny):
  model, params = tiny
  short = _batch(length=12, valid=12)
  long = _batch(length=20, valid=12, seed=5)
  long = dict(long, tokens=long["tokens"].at[:, :12].set(short["tokens"]),
              images=short["images"])
  apply = jax.jit(lambda b: model.apply({"params": params}, b))
  np.testing.assert_allclose(apply(long)[:, :12], apply(short), atol=1e-5)


def test_frozen_patterns_leave_projection_and_lora_trainable(tiny):
  _, params = tiny
  trainable, frozen = state_lib.split_frozen(params, model_lib.frozen_patterns())
  keys = traverse_util.flatten_dict(trainable, sep="/")
  assert keys and all(k.startswith("projection/") or k.split("/")[-1] in ("lora_a", "lora_b")
                      for k in keys)
  assert any("lora_b" in k for k in keys)
  frozen_keys = traverse_util.flatten_dict(frozen, sep="/")
  assert any(k.startswith("vision/") for k in frozen_keys)
  assert "lm/embed/embedding" in frozen_keys


@pytest.mark.parametrize("arg", ["tiny", "bench,stage=2", "7b,stage=3"])
def test_configs_build_and_freeze_what_exists(arg):
  config = config_lib.load_config(f"configs/minigpt_v2.py:{arg}")
  assert config.init_from == ""
  model = registry.build(config.model)
  batch = registry.dummy_batch(config, 1)
  params = state_lib.strip_boxes(
      jax.eval_shape(lambda b: model.init(jax.random.key(0), b), batch))["params"]
  assert not state_lib.unmatched_patterns(params, config.frozen)
  assert config.data.image_tokens == (config.data.image_size // 14) ** 2 // 4
  if arg.startswith("7b"):
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    lm_base = {k: v for k, v in traverse_util.flatten_dict(params["lm"], sep="/").items()
               if "lora_" not in k}
    assert count(lm_base) == 6_738_415_616  # LLaMA-2-7B
    assert count(params["projection"]) == 5632 * 4096 + 4096
    trainable, _ = state_lib.split_frozen(params, config.frozen)
    assert count(trainable) == 23_072_768 + 33_554_432  # projection + LoRA (q, v; r=64)


def test_config_options():
  config = config_lib.load_config("configs/minigpt_v2.py:tiny,stage=2,init_from=/ckpt")
  assert config.data.mixture == "minigpt_v2_stage2" and config.init_from == "/ckpt"
  assert config_lib.load_config("configs/minigpt_v2.py:tiny,freeze_lm=False").frozen == (
      r"vision/.*",)
  with pytest.raises(ValueError, match="stage"):
    config_lib.load_config("configs/minigpt_v2.py:tiny,stage=4")
  with pytest.raises(ValueError, match="option"):
    config_lib.load_config("configs/minigpt_v2.py:tiny,stages=2")


def test_config_init_from_as_option_and_override():
  spec, overrides, _ = config_lib.parse_config_args(
      ["--config", "configs/minigpt_v2.py:tiny,stage=3", "--config.init_from=/runs/s2"])
  config = config_lib.load_config(spec, overrides)
  assert config.init_from == "/runs/s2" and config.data.mixture == "minigpt_v2_stage3"


# ----------------------------------------------------------------------------------------
# FLOPs: DESIGN.md's rules (ViT 2N behind its stop-gradient, frozen LM 4N, rest 6N)
# ----------------------------------------------------------------------------------------
def test_train_flops_rules_follow_config_frozen():
  config = config_lib.load_config("configs/minigpt_v2.py:tiny")
  parts = flops.forward_parts(config)
  expected = (parts["vision"] + 3 * (parts["projection"] + parts["lora"])
              + 2 * (parts["lm"] + parts["logits"]))
  assert flops.flops_per_example(config, flops.config_treatment(config))[
      "train"] == pytest.approx(expected)
  unfrozen = config_lib.load_config("configs/minigpt_v2.py:tiny,freeze_lm=False")
  assert flops.train_flops(parts, flops.config_treatment(unfrozen)) == pytest.approx(
      parts["vision"] + 3 * (sum(parts.values()) - parts["vision"]))


def test_analytic_flops_match_xla_forward_and_gradient():
  """XLA's compiled forward, and gradient of the trainable params only, against the analytic
  counts (causal scores in full, as XLA computes them); XLA adds element-wise work on top
  (~3% forward, ~9% gradient at this narrow width)."""
  config = config_lib.load_config("configs/minigpt_v2.py:tiny,scan=False")  # unrolled: XLA
  model = registry.build(config.model)  # counts a scanned layer once
  spec = registry.batch_spec(config, 2)
  params = jax.eval_shape(lambda b: nn.unbox(model.init(jax.random.key(0), b)["params"]), spec)
  trainable, frozen = state_lib.split_frozen(params, config.frozen)

  def loss(trainable, frozen, batch):
    logits = model.apply({"params": state_lib.merge_params(trainable, frozen)}, batch)
    num, den = step_lib.token_cross_entropy(logits, batch)
    return num / den

  def xla_flops(fn, *args):
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"] / 2

  analytic = flops.flops_per_example(config, flops.config_treatment(config),
                                     causal_half=False)
  forward = xla_flops(lambda p, b: model.apply({"params": p}, b), params, spec)
  assert analytic["forward"] <= forward <= 1.05 * analytic["forward"]
  gradient = xla_flops(jax.grad(loss), trainable, frozen, spec)
  assert analytic["train"] <= gradient <= 1.12 * analytic["train"]  # 6N for all: ~1.5x off


# ----------------------------------------------------------------------------------------
# Boxes and template
# ----------------------------------------------------------------------------------------
def test_box_round_trip_and_truncation():
  rng = np.random.default_rng(0)
  for _ in range(200):
    x1, x2 = sorted(rng.integers(0, 101, 2))
    y1, y2 = sorted(rng.integers(0, 101, 2))
    box = (int(x1), int(y1), int(x2), int(y2))
    assert boxes.parse_box(boxes.box_text(box)) == box
  assert boxes.box_text((0, 5, 100, 100)) == "{<0><5><100><100>}"
  # int(coord / size * 100): 13.9 / 64 -> 21.7 -> 21; 63.99 / 64 -> 99.98 -> 99
  assert boxes.format_box((13.9, 0, 64, 63.99), 64, 64) == "{<21><0><100><99>}"
  assert boxes.format_box((10, 10, 20, 30), 200, 100) == "{<5><10><10><30>}"
  grounded = boxes.grounded_text("two red circles", [(1, 2, 3, 4), (5, 6, 7, 8)])
  assert grounded == "<p>two red circles</p>{<1><2><3><4>}<delim>{<5><6><7><8>}"
  text = f"{grounded} on the left and " + boxes.grounded_text("a star", [(0, 0, 9, 9)])
  assert boxes.parse_grounded(text) == [("two red circles", [(1, 2, 3, 4), (5, 6, 7, 8)]),
                                        ("a star", [(0, 0, 9, 9)])]


@pytest.mark.parametrize("text, message", [
    ("{<1><2><3>}", "not a box"), ("<1><2><3><4>", "not a box"),
    ("{<1><2><3><4>", "not a box"), ("{<a><2><3><4>}", "not a box"),
    ("{<1><2><3><101>}", "outside"), ("{<-1><2><3><4>}", "outside"),
    ("{<5><2><3><4>}", "out of order"), ("{<1><2><3><4>} extra", "not a box"), ("", "not a box"),
])
def test_malformed_boxes_raise(text, message):
  with pytest.raises(boxes.BoxFormatError, match=message):
    boxes.parse_box(text)


def test_malformed_grounding_and_pixel_boxes_raise():
  with pytest.raises(boxes.BoxFormatError, match="well-formed"):
    boxes.parse_grounded("<p>cat</p> sits here")
  with pytest.raises(boxes.BoxFormatError):
    boxes.parse_grounded("<p>cat</p>{<1><2><3><4>}<delim>")
  with pytest.raises(boxes.BoxFormatError, match="outside the image"):
    boxes.format_box((0, 0, 65, 10), 64, 64)
  with pytest.raises(boxes.BoxFormatError, match="out of order"):
    boxes.format_box((30, 0, 10, 10), 64, 64)
  with pytest.raises(boxes.BoxFormatError, match="phrase"):
    boxes.grounded_text("<p>", [(0, 0, 1, 1)])


def test_task_identifier_round_trip(vocab):
  assert len(data_lib.TASK_IDENTIFIERS) == 6
  for task in data_lib.TASK_IDENTIFIERS:
    turn = data_lib.Turn("what is here?", "a cat", task)
    ex = data_lib.encode_conversation(vocab, [turn], image_tokens=2, sequence_length=64)
    text = vocab.decode(ex["tokens"][ex["token_mask"] > 0])
    assert text == f"[INST] <Img><image><image> </Img> {task} what is here? [/INST] a cat"
    instruction = text.split("</Img> ")[1].split(" [/INST]")[0]
    assert data_lib.split_task(instruction) == (task, "what is here?")
  assert data_lib.split_task("describe it") == ("", "describe it")
  with pytest.raises(ValueError, match="unknown task identifier"):
    data_lib.split_task("[vqa2] what?")
  with pytest.raises(ValueError, match="task identifier"):
    data_lib.Turn("q", "a", "[foo]")


# ----------------------------------------------------------------------------------------
# Conversation encoding and synthetic data
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vocab():
  return Vocab()


def test_encoding_puts_loss_on_answers_only(vocab):
  turns = [data_lib.Turn("What colour is the star?", "red", "[vqa]"),
           data_lib.Turn("Where is it?", "{<1><2><3><4>}", "[refer]")]
  ex = data_lib.encode_conversation(vocab, turns, image_tokens=4, sequence_length=96)
  n = int(ex["token_mask"].sum())
  np.testing.assert_array_equal(ex["targets"][:n - 1], ex["tokens"][1:n])
  pos = int(ex["image_positions"][0])
  assert (ex["tokens"][pos:pos + 4] == data_lib.placeholder_id(vocab)).all()
  assert vocab.decode(ex["tokens"][:pos]) == "[INST] <Img>"
  answer_ids = ex["targets"][ex["loss_mask"] > 0]
  assert list(answer_ids).count(EOS_ID) == 2
  pieces = np.split(answer_ids, np.nonzero(answer_ids == EOS_ID)[0][:-1] + 1)
  assert [vocab.decode(p) for p in pieces] == ["red", "{<1><2><3><4>}"]
  first_answer = int(np.argmax(ex["loss_mask"]))  # its target is the first answer token
  assert (vocab.decode(ex["tokens"][pos + 4:first_answer + 1])
          == "</Img> [vqa] What colour is the star? [/INST]")
  assert ex["loss_mask"][n:].sum() == 0 and ex["token_mask"][n:].sum() == 0


def test_encoding_drops_turns_that_do_not_fit(vocab):
  turns = [data_lib.Turn("q", "yes", "[vqa]"), data_lib.Turn("q " * 40, "no", "[vqa]")]
  ex = data_lib.encode_conversation(vocab, turns, image_tokens=4, sequence_length=40)
  assert list(ex["targets"][ex["loss_mask"] > 0]).count(EOS_ID) == 1
  with pytest.raises(preprocessors.BadRecord, match="sequence_length"):
    data_lib.encode_conversation(vocab, turns[1:], image_tokens=4, sequence_length=40)


def _scene_record(groups, size=64, seed=0):
  image = scenes.render_scene(groups, size, np.random.default_rng(seed))
  jpeg = io.BytesIO()
  image.save(jpeg, format="PNG")
  return np.asarray(image), {"image": jpeg.getvalue(), "text": scenes.describe(groups),
                             "key": "000000000"}


def test_scene_objects_and_boxes():
  rng = np.random.default_rng(1)
  for _ in range(20):
    groups = scenes.sample_scene(rng)
    assert scene_objects.parse_scene_caption(scenes.describe(groups)) == groups
    pixels, _ = _scene_record(groups, seed=int(rng.integers(1000)))
    objects = scene_objects.scene_objects(pixels, scenes.describe(groups))
    assert len(objects) == len(groups)
    for obj, (count, colour, shape, position) in zip(objects, groups):
      assert colour in obj.phrase and shape in obj.phrase
      rx0, ry0, rx1, ry1 = (int(v * 100) for v in scenes.REGIONS[position])
      x1, y1, x2, y2 = obj.box
      assert rx0 <= x1 < x2 <= rx1 + 1 and ry0 <= y1 < y2 <= ry1 + 1
  assert scene_objects.parse_scene_caption("hello world") is None
  words = scenes.render_text("hello", 64, rng)
  (obj,) = scene_objects.scene_objects(np.asarray(words), "hello")
  assert obj.phrase == "hello" and obj.box[0] < obj.box[2]


def test_processor_writes_the_model_batch_for_every_task():
  data_config = config_lib.load_config("configs/minigpt_v2.py:tiny").data
  data_config.image_size, data_config.image_tokens, data_config.sequence_length = 56, 4, 128
  processor = data_lib.Processor(data_config, seed=0)
  _, raw = _scene_record([(2, "red", "circle", "left"), (1, "blue", "star", "right")])
  spec = model_lib.batch_spec(data_config, 1)
  for index, task in enumerate(data_lib.TASKS):
    ex = processor(index, (task, raw))
    assert not isinstance(ex, health.Skipped), ex
    ex.pop("_source")
    assert set(ex) == set(spec)
    for key, s in spec.items():
      assert ex[key].shape == s.shape[1:] and ex[key].dtype == s.dtype, key
    assert ex["loss_mask"].sum() > 0
  bad = processor(0, (TASKS["minigpt_v2_vqa"], dict(raw, image=b"junk")))
  assert isinstance(bad, health.Skipped)


def test_caption_tasks_take_any_web_image_and_object_tasks_skip_it():
  """Stage 1's weak captions are web alt-text on photos: no scene objects to recover."""
  data_config = config_lib.load_config("configs/minigpt_v2.py:tiny").data
  data_config.image_size, data_config.image_tokens, data_config.sequence_length = 56, 4, 128
  processor = data_lib.Processor(data_config, seed=0)
  photo = io.BytesIO()
  Image.fromarray(np.full((48, 80, 3), (90, 140, 60), np.uint8)).save(photo, format="JPEG")
  raw = {"key": "web0", "image": photo.getvalue(), "text": "A cat on a mat."}
  for template in data_lib.CAPTION_ONLY:
    ex = processor(0, (TASKS[f"minigpt_v2_{template}"], raw))
    assert not isinstance(ex, health.Skipped), ex
    answer = ex["targets"][ex["loss_mask"] > 0]
    assert Vocab(data_config.vocab_path).decode([int(t) for t in answer[:-1]]).strip() in (
        "A cat on a mat.", "The image shows A cat on a mat.")
  skipped = processor(0, (TASKS["minigpt_v2_grounding"], raw))
  assert isinstance(skipped, health.Skipped) and "no text pixels" in skipped.reason


def test_stage_mixtures():
  for stage, name in data_lib.STAGE_MIXTURES.items():
    mixture = catalog.resolve(name, data_lib)
    rates = {spec.name: rate for spec, rate in mixture.tasks}
    assert abs(sum(rates.values()) - 1.0) < 1e-9
    weak = sum(r for t, r in rates.items() if "weak" in t)
    assert (weak > 0.5) if stage == 1 else (weak == 0)
  assert "minigpt_v2_multi_turn" in dict(data_lib.MIXTURES["minigpt_v2_stage3"])


def test_tiny_model_on_converted_batch(tiny, vocab):
  model, params = tiny
  data_config = config_lib.load_config("configs/minigpt_v2.py:tiny").data
  data_config.image_size, data_config.image_tokens, data_config.sequence_length = 56, 4, 96
  processor = data_lib.Processor(data_config, seed=0)
  _, raw = _scene_record([(3, "green", "square", "top")])
  examples = [processor(i, (TASKS["minigpt_v2_refer"], raw)) for i in range(2)]
  batch = {k: jnp.asarray(np.stack([e[k] for e in examples])) for k in examples[0]
           if k != "_source"}
  batch["tokens"] = jnp.minimum(batch["tokens"], VOCAB - 1)
  batch["targets"] = jnp.minimum(batch["targets"], VOCAB - 1)
  logits = jax.jit(lambda b: model.apply({"params": params}, b))(batch)
  assert logits.shape == (2, 96, VOCAB) and np.isfinite(logits).all()


def test_greedy_generation_with_cache_equals_full_forward(tiny):
  model, params = tiny
  new = 4
  batch = _batch(length=20)
  lengths = np.array([9, 12])
  batch["token_mask"] = (jnp.arange(20)[None] < lengths[:, None]).astype(jnp.float32)
  generated = decode_lib.generate(model, params, batch, new, eos_id=-1).tokens
  apply = jax.jit(lambda b: model.apply({"params": params}, b))
  tokens = np.array(batch["tokens"])
  for step in range(new):  # no cache: extend each prompt in place and rerun everything
    mask = (np.arange(20)[None] < (lengths + step)[:, None]).astype(np.float32)
    logits = apply(dict(batch, tokens=jnp.asarray(tokens), token_mask=jnp.asarray(mask)))
    expected = np.argmax(np.asarray(logits)[np.arange(2), lengths + step - 1], axis=-1)
    np.testing.assert_array_equal(generated[:, step], expected)
    tokens[np.arange(2), lengths + step] = expected


def test_open_last_turn_gives_a_generation_prompt(vocab):
  turns = [data_lib.Turn("What colour?", "red", "[vqa]"), data_lib.Turn("Where?", "", "[refer]")]
  ex = data_lib.encode_conversation(vocab, turns, image_tokens=4, sequence_length=96,
                                    open_last=True)
  n = int(ex["token_mask"].sum())
  eos = int(np.nonzero(ex["tokens"] == EOS_ID)[0][0])  # ends the first answer
  assert vocab.decode(ex["tokens"][eos + 1:n]) == "[INST] [refer] Where? [/INST]"
  assert list(ex["targets"][ex["loss_mask"] > 0]).count(EOS_ID) == 1  # first answer only
  with pytest.raises(preprocessors.BadRecord, match="turn 1"):  # never drop the question
    data_lib.encode_conversation(vocab, turns, image_tokens=4, sequence_length=64,
                                 open_last=True)
