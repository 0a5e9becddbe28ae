"""CogAgent: cross-module reach and zero-init parity, visual expert, boxes, GUI/OCR data,
training through the real loop (loss falls, resume), 18B layout and FLOPs."""
import io
import json
import os
import shutil

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
from vlm_jax import flops
from vlm_jax.data import catalog, health
from vlm_jax.data import processor as processor_lib
from vlm_jax.data.boxes import permille as boxes
from vlm_jax.data.families import cogagent as data_lib
from vlm_jax.data.synthetic import screens
from vlm_jax.inspection import model as model_inspection
from vlm_jax.models import cogagent as model_lib
from vlm_jax.models import registry
from vlm_jax.train import loop

WIDTH, HIGH_RES_WIDTH = 32, 24
VIT = dict(depth=1, num_heads=2, mlp_dim=32, patch_size=14, class_token=True)
TINY = dict(lm=dict(vocab_size=64, width=WIDTH, num_layers=2, num_heads=4, mlp_dim=48),
            vision=dict(VIT, width=16), high_res=dict(VIT, width=HIGH_RES_WIDTH),
            adapter=dict(mlp_dim=40), cross=dict(width=16, heads=4), visual_expert=True,
            cross_module=True)
LOW, HIGH, LENGTH = 28, 56, 16  # 2x2 + 2 = 6 image slots; 4x4 = 16 high-res tokens


def _batch(seed=0, valid=(13, 16)):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {"images": jax.random.uniform(k1, (2, 1, LOW, LOW, 3), minval=-1, maxval=1),
          "high_res_images": jax.random.uniform(k2, (2, 1, HIGH, HIGH, 3), minval=-1, maxval=1),
          "image_mask": jnp.ones((2, 1)),
          "tokens": jax.random.randint(k3, (2, LENGTH), 4, 64),
          "token_mask": (jnp.arange(LENGTH)[None] < jnp.array(valid)[:, None]).astype(
              jnp.float32),
          "image_positions": jnp.array([[1], [3]], jnp.int32)}


def _init(**fields):
  model = builders.build("cogagent", **{**TINY, **fields})
  return model, nn.unbox(jax.jit(model.init)(jax.random.key(0), _batch()))["params"]


@pytest.fixture(scope="module")
def tiny():
  return _init()


def _apply(model, params, batch):
  return jax.jit(lambda p, b: model.apply({"params": p}, b))(params, batch)


def _flat(params):
  return traverse_util.flatten_dict(params, sep="/")


# ----------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------
def test_every_position_sees_every_high_res_token_of_its_own_example(tiny):
  model, params = tiny
  batch = _batch()

  def hidden(high_res):
    def run(m):
      x, token_mask, extra = m.embed_inputs(batch)
      return m.lm.trunk(x, token_mask=token_mask, extra=dict(extra, high_res=high_res))
    return model.apply({"params": params}, method=run).sum(-1)  # [B, T]

  high_res = model.apply({"params": params}, batch["high_res_images"],
                         method="encode_high_res")
  assert high_res.shape == (2, (HIGH // 14) ** 2, HIGH_RES_WIDTH)
  jac = jax.jit(jax.jacrev(hidden))(high_res)  # [B, T, B, P, Dc]
  reach = np.abs(np.asarray(jac)).sum(-1)  # [B, T, B, P]
  for b in range(2):
    assert (reach[b, :, b] > 0).all()  # every position (image slots too), every token
    assert (reach[b, :, 1 - b] == 0).all()  # never the other example's screen


def test_zero_cross_output_projection_equals_the_low_res_only_model(tiny):
  model, params = tiny
  flat = _flat(params)
  flat["lm/layers/layers/cross_attention/out/kernel"] = jnp.zeros_like(
      flat["lm/layers/layers/cross_attention/out/kernel"])
  zeroed = traverse_util.unflatten_dict(flat, sep="/")
  low_model, low_params = _init(cross_module=False)
  low_keys = set(_flat(low_params))
  assert low_keys == {k for k in flat if not k.startswith("high_res/") and "cross" not in k}
  shared = traverse_util.unflatten_dict({k: flat[k] for k in low_keys}, sep="/")
  batch = _batch(seed=1)
  expected = _apply(low_model, shared, batch)
  np.testing.assert_allclose(_apply(model, zeroed, batch), expected, atol=1e-5)
  assert np.abs(_apply(model, params, batch) - expected).max() > 1e-3


def test_visual_tokens_with_boi_eoi_are_spliced_and_routed(tiny):
  model, params = tiny
  batch = dict(_batch(), image_mask=jnp.array([[1.0], [0.0]]))
  x, _, extra = model.apply({"params": params}, batch, method="embed_inputs")
  visual = model.apply({"params": params}, batch["images"], method="encode_images")
  slots = model_lib.image_tokens(LOW, 14)
  assert visual.shape == (2, 1, slots, WIDTH)
  np.testing.assert_allclose(visual[0, 0, 0], params["adapter"]["boi"], atol=1e-6)
  np.testing.assert_allclose(visual[0, 0, -1], params["adapter"]["eoi"], atol=1e-6)
  np.testing.assert_allclose(x[0, 1:1 + slots], visual[0, 0], atol=1e-6)
  expected = np.zeros((2, LENGTH), bool)
  expected[0, 1:1 + slots] = True  # example 1 has no image: all text
  np.testing.assert_array_equal(extra["is_vision"], expected)


def test_visual_expert_with_language_weights_equals_the_plain_lm(tiny):
  model, params = tiny
  flat = _flat(params)
  for key in list(flat):
    if "/vision_" in key:
      flat[key] = flat[key.replace("vision_mlp", "mlp").replace("vision_", "")]
  copied = traverse_util.unflatten_dict(flat, sep="/")
  plain, plain_params = _init(visual_expert=False)
  shared = traverse_util.unflatten_dict(
      {k: flat[k] for k in _flat(plain_params)}, sep="/")
  batch = _batch(seed=2)
  expected = _apply(plain, shared, batch)
  np.testing.assert_allclose(_apply(model, copied, batch), expected, atol=1e-5)
  assert np.abs(_apply(model, params, batch) - expected).max() > 1e-3


# ----------------------------------------------------------------------------------------
# Boxes
# ----------------------------------------------------------------------------------------
def test_box_round_trip_and_normalisation():
  rng = np.random.default_rng(0)
  for _ in range(200):
    x0, x1 = sorted(int(v) for v in rng.integers(0, 1000, 2))
    y0, y1 = sorted(int(v) for v in rng.integers(0, 1000, 2))
    text = boxes.box_text((x0, y0, x1, y1))
    assert boxes.parse_boxes(text) == [(x0, y0, x1, y1)]
    assert boxes.box_text(boxes.parse_boxes(text)) == text
  assert boxes.box_text((12, 5, 678, 999)) == "[[012,005,678,999]]"
  assert boxes.box_text([(1, 2, 3, 4), (5, 6, 7, 8)]) == "[[001,002,003,004];[005,006,007,008]]"
  assert boxes.parse_boxes(" [[001,002,003,004];[005,006,007,008]] ") == [(1, 2, 3, 4),
                                                                           (5, 6, 7, 8)]
  # min(999, int(v / size * 1000)): the right/bottom edge maps to 999, not 1000
  assert boxes.format_box((0, 10, 112, 55.99), 112, 112) == "[[000,089,999,499]]"
  assert boxes.find_boxes("click [[001,002,003,004]] then [[010,020,030,040];[005,006,007,"
                          "008]]") == [(1, 2, 3, 4), (10, 20, 30, 40), (5, 6, 7, 8)]
  x0, y0, x1, y1 = boxes.pixel_box((100, 200, 500, 999), 1120, 1120)
  assert boxes.normalise_box((x0, y0, x1, y1), 1120, 1120) == (100, 200, 500, 999)


@pytest.mark.parametrize("text, message", [
    ("[[1,2,3,4]]", "not a box"), ("[[0001,002,003,004]]", "not a box"),
    ("[001,002,003,004]", "not a box"), ("[[001,002,003]]", "not a box"),
    ("[[001, 002,003,004]]", "not a box"), ("[[001,002,003,004]", "not a box"),
    ("[[001,002,003,004];]", "not a box"), ("[[-01,002,003,004]]", "not a box"),
    ("[[001,002,003,004]] extra", "not a box"), ("", "not a box"),
    ("[[005,002,003,004]]", "out of order"), ("[[001,009,003,004]]", "out of order"),
])
def test_malformed_box_text_raises(text, message):
  with pytest.raises(boxes.BoxFormatError, match=message):
    boxes.parse_boxes(text)


def test_out_of_range_boxes_raise():
  with pytest.raises(boxes.BoxFormatError, match="not an integer in 0..999"):
    boxes.box_text((0, 0, 1000, 5))
  with pytest.raises(boxes.BoxFormatError, match="not an integer in 0..999"):
    boxes.box_text((0, -1, 10, 5))
  with pytest.raises(boxes.BoxFormatError, match="outside the image"):
    boxes.format_box((0, 0, 113, 10), 112, 112)
  with pytest.raises(boxes.BoxFormatError, match="4 coordinates"):
    boxes.box_text((1, 2, 3))
  with pytest.raises(boxes.BoxFormatError, match="must be positive"):
    boxes.format_box((0, 0, 1, 1), 0, 10)


# ----------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def processor():
  config = config_lib.load_config("configs/cogagent.py:tiny")
  return config, data_lib.Processor(config.data, seed=0)


def test_screen_elements_are_distinct_visible_and_apart():
  rng = np.random.default_rng(0)
  for _ in range(10):
    image, elements = screens.render_screen(112, screens.screen_words("a red star", rng), rng)
    pixels = np.asarray(image, np.int32)
    assert elements and len({e.name for e in elements}) == len(elements)
    assert {e.kind for e in elements} <= {"button", "label", "icon"}
    for i, e in enumerate(elements):
      x0, y0, x1, y1 = e.box
      assert 0 <= x0 < x1 <= 112 and 0 <= y0 < y1 <= 112
      assert np.ptp(pixels[y0:y1, x0:x1]) > 100  # something is drawn there
      for other in elements[i + 1:]:  # boxes never overlap, so a box names one element
        a0, b0, a1, b1 = other.box
        assert x1 <= a0 or a1 <= x0 or y1 <= b0 or b1 <= y0


def test_processor_writes_the_model_batch_for_every_task(processor):
  config, proc = processor
  batch_spec = model_lib.batch_spec(config.data, 1)
  tasks = {spec.template: spec for spec in data_lib.TASKS}
  source = catalog.make_source(tasks["ocr"], "", "train")
  vocab = proc.vocab
  for index in range(6):
    raw = source[index]
    for task, spec in tasks.items():
      ex = proc(index, (spec, raw))
      assert not isinstance(ex, health.Skipped), ex
      ex.pop("_source")
      assert set(ex) == set(batch_spec)
      for key, s in batch_spec.items():
        assert ex[key].shape == s.shape[1:] and ex[key].dtype == s.dtype, key
      answer = vocab.decode(ex["targets"][ex["loss_mask"] > 0])
      slots = config.data.image_tokens
      assert (ex["tokens"][1:1 + slots] == vocab.placeholder_id).all()
      prompt = vocab.decode(ex["tokens"][1 + slots:int(ex["token_mask"].sum())])
      assert prompt.startswith("Question: ") and prompt.endswith(f"Answer: {answer}")
      if task == "grounding":  # the answer box holds the named element
        (box,) = boxes.parse_boxes(answer)
        x0, y0, x1, y1 = (int(v) for v in boxes.pixel_box(box, 112, 112))
        crop = ex["high_res_images"][0, y0:y1 + 1, x0:x1 + 1]
        assert crop.size and np.ptp(crop) > 0.3
      if task == "ocr":
        assert answer and answer in " ".join(raw["text"].split())
  bad = proc(0, (tasks["ocr"], dict(source[0], problem="broken tar")))
  assert isinstance(bad, health.Skipped)


def test_caption_template_reads_the_record_s_own_image(processor):
  """Real image-text pairs (an ingested directory) feed CogAgent by the `caption` template,
  the default for pairs: the record's picture, its caption as the answer."""
  config, proc = processor
  spec = catalog.TaskSpec("real_pairs", "pairs", "webdataset", catalog.SAMPLE_PAIRS)
  spec = processor_lib.with_template(spec, data_lib.TEMPLATES, "cogagent")
  assert spec.template == "caption"
  source = catalog.make_source(spec, "", "validation")
  raw = source[0]
  ex = proc(0, (spec, raw))
  answer = proc.vocab.decode(ex["targets"][ex["loss_mask"] > 0])
  assert answer == raw["text"]
  picture = np.asarray(Image.open(io.BytesIO(raw["image"])).convert("RGB").resize((56, 56)))
  assert np.abs(ex["images"][0] - (picture / 127.5 - 1)).mean() < 0.05


def test_mixture_is_the_family_s():
  rates = dict(data_lib.MIXTURES["cogagent_pretrain"])
  assert set(rates) == {t.name for t in data_lib.TASKS} and abs(sum(rates.values()) - 1) < 1e-9


# ----------------------------------------------------------------------------------------
# Training through the real loop (tiny): loss falls, resume replays the same losses
# ----------------------------------------------------------------------------------------
def _losses(workdir):
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      out[record["step"]] = record["loss"]
  return out


def test_tiny_trains_and_resumes_with_the_same_losses(tmp_path):
  config = config_lib.load_config("configs/cogagent.py:tiny", [
      ("batch_size", "8"), ("num_train_steps", "20"), ("log_every_steps", "1"),
      ("checkpoint.every_steps", "17"), ("checkpoint.async_save", "False"),
      ("optimizer.warmup_steps", "4"), ("mesh.shape", "(1, 1, 1)")])
  loop.train(config, str(tmp_path), devices=jax.devices()[:1])
  first = _losses(tmp_path)
  assert sorted(first) == list(range(1, 21))
  start, end = np.mean([first[s] for s in range(1, 4)]), np.mean([first[s] for s in range(16, 21)])
  assert end < 0.5 * start, (start, end)  # ~7.4 -> ~2.3
  shutil.rmtree(tmp_path / "checkpoints" / "20")
  loop.train(config, str(tmp_path), devices=jax.devices()[:1])  # resumes from step 17
  replayed = _losses(tmp_path)
  np.testing.assert_allclose([replayed[s] for s in range(18, 21)],
                             [first[s] for s in range(18, 21)], rtol=1e-5)


# ----------------------------------------------------------------------------------------
# Configs, paper layout, FLOPs
# ----------------------------------------------------------------------------------------
def _abstract_params(config):
  model = registry.build(config.model)
  return state_lib.strip_boxes(jax.eval_shape(
      lambda b: model.init(jax.random.key(0), b), registry.dummy_batch(config, 1)))["params"]


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_18b_layout_param_counts():
  config = config_lib.load_config("configs/cogagent.py:18b")
  params = _abstract_params(config)
  flat = _flat(params)
  layer = lambda pattern: sum(int(np.prod(v.shape)) for k, v in flat.items()
                              if k.startswith("lm/") and pattern in k)
  expert = layer("/vision_")
  cross = layer("cross")
  language = _count(params["lm"]) - expert - cross
  assert language == 6_738_415_616  # Vicuna-7B (LLaMA-7B layout, vocab 32000)
  assert expert == 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008)  # CogVLM's visual expert
  # RMSNorm + q 4096->1024, k/v 1024->1024 each, out 1024->4096, no bias; 32 layers
  assert cross == 32 * (4096 + 4096 * 1024 + 2 * 1024 * 1024 + 1024 * 4096)
  assert flat["high_res/pos_embedding/pos_embedding"].shape == (1 + 6400, 1024)
  assert flat["vision/pos_embedding/pos_embedding"].shape == (1 + 256, 1792)
  visual = _count(params) - language
  assert 10.5e9 < visual < 12e9  # published: 11B visual + 7B language
  assert config.data.image_tokens == 258
  trainable, _ = state_lib.split_frozen(params, config.frozen)  # stage 1: cross-module only
  assert _count(trainable) == cross + _count(params["high_res"])
  stage2 = config_lib.load_config("configs/cogagent.py:18b,stage=2")
  trainable, _ = state_lib.split_frozen(params, stage2.frozen)
  assert _count(trainable) == cross + expert + _count(params["high_res"])
  # vlm-info's counts, without allocating the 18B config's batch (4608 images of 1120 px).
  described = model_inspection.describe(config, 8)["params"]
  assert (described["total"], described["trainable"]) == (_count(params), cross +
                                                          _count(params["high_res"]))


def test_configs_and_options():
  for arg in ("tiny", "bench", "18b,cross_module=False,image=490,stage=0"):
    config = config_lib.load_config(f"configs/cogagent.py:{arg}")
    params = _abstract_params(config)
    assert not state_lib.unmatched_patterns(params, config.frozen)
  assert config.data.image_tokens == 35 * 35 + 2 and "high_res" not in params
  with pytest.raises(ValueError, match="stage"):
    config_lib.load_config("configs/cogagent.py:tiny,stage=3")
  with pytest.raises(ValueError, match="multiple of the patch size"):
    config_lib.load_config("configs/cogagent.py:tiny,high_res=100")
  with pytest.raises(ValueError, match="option"):
    config_lib.load_config("configs/cogagent.py:tiny,crossmodule=False")


def _xla_forward_flops(config, batch_size=2):
  config.model.scan_layers = False  # cost analysis counts a loop body once
  model = registry.build(config.model)
  spec = registry.batch_spec(config, batch_size)
  params = jax.eval_shape(lambda b: nn.unbox(model.init(jax.random.key(0), b)["params"]), spec)
  compiled = jax.jit(lambda p, b: model.apply({"params": p}, b)).lower(params, spec).compile()
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  return analysis["flops"] / batch_size


def test_analytic_forward_flops_match_xla():
  config = config_lib.load_config("configs/cogagent.py:bench")
  analytic = flops.flops_per_example(config, causal_half=False)["forward"]
  measured = _xla_forward_flops(config)
  assert analytic <= measured <= 1.05 * analytic, measured / analytic
