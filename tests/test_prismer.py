"""Prismer: expert stems, Experts Resampler, adaptors, freezing, sizes, FLOPs, training."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from vlm_jax import config as config_lib
from vlm_jax import flops
from vlm_jax import params as state_lib
from vlm_jax.models import prismer as model_lib
from vlm_jax.nn import expert_vit
from vlm_jax.models import registry
from vlm_jax.nn import expert_stem, vit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "prismer.py")
VISION = dict(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=8, image_size=32,
              num_latents=8, resampler_layers=2, resampler_heads=4)
LABEL_DIM = 16


def _inputs(experts, seed=0, size=32):
  keys = iter(jax.random.split(jax.random.key(seed), 16))
  images = jax.random.uniform(next(keys), (2, size, size, 3), minval=-1, maxval=1)
  maps = {}
  for name in experts:
    channels = expert_vit.DENSE_EXPERTS.get(name, LABEL_DIM)
    maps[name] = jax.random.normal(next(keys), (2, size, size, channels))
  instances = jax.random.randint(next(keys), (2, size, size), 0, 256)
  return images, maps, instances


def _vision(experts, **kw):
  return expert_vit.PrismerVision(**{**VISION, **kw}, experts=tuple(experts))


def _init(module, *args):
  return nn.unbox(jax.jit(module.init)(jax.random.key(0), *args))["params"]


# ----------------------------------------------------------------------------------------
# Stems, resampler, switching experts
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("patch", [16, 14])
@pytest.mark.parametrize("name", expert_vit.EXPERTS)
def test_each_expert_stem_brings_its_map_to_the_patch_grid(name, patch):
  label = name in expert_vit.LABEL_EXPERTS
  channels = 64 if label else expert_vit.DENSE_EXPERTS[name]
  strides = expert_stem.LABEL_STRIDES if label else expert_stem.DENSE_STRIDES
  stem = expert_stem.ExpertStem(768, strides)
  grid = (224 // patch, 224 // patch)
  maps = jax.ShapeDtypeStruct((2, 224, 224, channels), jnp.float32)
  out, variables = jax.eval_shape(lambda x: stem.init_with_output(jax.random.key(0), x, grid),
                                  maps)
  assert out.shape == (2, *grid, 768)
  kernels = [v["kernel"].shape for k, v in sorted(nn.unbox(variables)["params"].items())
             if k.startswith("conv_")]
  assert kernels == [(3, 3, channels, 96), (3, 3, 96, 192), (3, 3, 192, 384),
                     (3, 3, 384, 768)]  # w/8 -> w/4 -> w/2 -> w, then the 1x1 projection


def test_nearest_grid_takes_cell_centres_of_numpy_or_traced_ids():
  ids = np.arange(16, dtype=np.int32).reshape(1, 4, 4)  # numpy, as vlm-compile's example
  want = [[[5, 7], [13, 15]]]  # the centres of the four 2x2 cells: rows/cols 1 and 3
  assert jax.jit(lambda: expert_vit.nearest_grid(ids, (2, 2)))().tolist() == want
  assert expert_vit.nearest_grid(jnp.asarray(ids), (2, 2)).tolist() == want


def test_stem_upsamples_dense_maps_more_than_label_maps():
  grid = (4, 4)
  seen = {}
  for kind, strides in (("dense", expert_stem.DENSE_STRIDES),
                        ("label", expert_stem.LABEL_STRIDES)):
    stem = expert_stem.ExpertStem(32, strides)
    x = jax.ShapeDtypeStruct((1, 32, 32, 1), jnp.float32)
    _, state = jax.eval_shape(lambda x: stem.init_with_output(  # pylint: disable=cell-var-from-loop
        jax.random.key(0), x, grid, capture_intermediates=True), x)
    seen[kind] = state["intermediates"]["conv_0"]["__call__"][0].shape[1]
  assert seen == {"dense": 32, "label": 8}  # 16x and 4x the grid, halved by conv_0


def test_switching_an_expert_off_changes_only_the_expert_tokens():
  images, maps, instances = _inputs(("depth", "seg", "obj_detection"))
  on, off = _vision(("depth", "seg", "obj_detection")), _vision(("depth", "seg"))
  params = _init(on, images, maps, instances)
  params_off = {**params, "embedder": {k: v for k, v in params["embedder"].items()
                                       if k not in ("stem_obj_detection", "instance_embedding")}}
  embed = lambda m, p: jax.jit(lambda p: m.apply({"params": p}, images, maps, instances,
                                                 method="embed_inputs"))(p)
  a, b = embed(on, params), embed(off, params_off)
  rgb = (32 // 8) ** 2
  assert a.shape == b.shape == (2, rgb + VISION["num_latents"], VISION["width"])
  np.testing.assert_array_equal(a[:, :rgb], b[:, :rgb])
  assert np.abs(np.asarray(a[:, rgb:] - b[:, rgb:])).min() > 1e-6  # every expert token moved


@pytest.mark.parametrize("experts", [("depth",), ("depth", "edge"), expert_vit.EXPERTS])
def test_resampler_output_length_is_independent_of_the_number_of_experts(experts):
  images, maps, instances = _inputs(experts)
  module = _vision(experts)
  out = jax.eval_shape(lambda *a: module.init_with_output(
      {"params": jax.random.key(0)}, *a, method="embed_inputs")[0], images, maps, instances)
  assert out.shape == (2, 16 + VISION["num_latents"], VISION["width"])


def test_prismerz_sees_rgb_tokens_only():
  images, maps, _ = _inputs(())
  module = _vision(())
  params = _init(module, images, maps)
  assert not any(k.startswith("stem_") or k == "resampler" for k in params["embedder"])
  out = jax.jit(lambda p: module.apply({"params": p}, images, maps))(params)
  assert out.shape == (2, 16, VISION["width"])


def test_instance_embeddings_mark_detected_instances():
  images, maps, instances = _inputs(("obj_detection",))
  module = _vision(("obj_detection",))
  params = _init(module, images, maps, instances)
  apply = jax.jit(lambda inst, seed, det: module.apply(
      {"params": params}, images, maps, inst, det, method="embed_inputs",
      rngs={"dropout": jax.random.key(seed)}), static_argnums=2)
  embed = lambda inst, det=True, seed=0: apply(inst, seed, det)
  base = embed(instances)
  assert not np.allclose(base, embed(instances + 1))  # other instance ids, other vectors
  np.testing.assert_array_equal(base, embed(instances))
  assert not np.allclose(embed(instances, False, 1), embed(instances, False, 2))  # shuffled


# ----------------------------------------------------------------------------------------
# Adaptors
# ----------------------------------------------------------------------------------------
def _randomise(params, key):
  flat = traverse_util.flatten_dict(params)
  keys = jax.random.split(key, len(flat))
  return traverse_util.unflatten_dict(
      {k: v + 0.1 * jax.random.normal(kk, v.shape) for (k, v), kk in zip(flat.items(), keys)})


def test_zero_up_projections_and_no_experts_give_the_plain_vit():
  images, maps, _ = _inputs(())
  ours = _vision((), scan_layers=False)
  plain = vit.ViT(patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=64,
                  mlp_activation="quick_gelu", pre_norm=True, patch_bias=False,
                  scan_layers=False)
  params = _randomise(_init(ours, images, maps), jax.random.key(1))
  zero_up = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if "up" in [getattr(p, "key", "") for p in path] else x,
      params)
  vit_params = {
      "patch_embedding": params["embedder"]["patch_embedding"],
      "pos_embedding": {"pos_embedding":
                        params["embedder"]["pos_embedding"]["pos_embedding"].reshape(16, 32)},
      "pre_norm": params["pre_norm"], "encoder_norm": params["encoder_norm"],
      "encoder": {layer: {k: v for k, v in p.items() if k != "adaptor"}
                  for layer, p in params["encoder"].items()},
  }
  expected = jax.jit(lambda p: plain.apply({"params": p}, images))(vit_params)
  run = jax.jit(lambda p: ours.apply({"params": p}, images, maps))
  np.testing.assert_allclose(run(zero_up), expected, atol=1e-5, rtol=1e-5)
  assert not np.allclose(run(params), expected, atol=1e-3)


# ----------------------------------------------------------------------------------------
# Whole model: freezing, sizes, FLOPs
# ----------------------------------------------------------------------------------------
def _abstract_params(spec):
  config = config_lib.load_config(f"{CONFIG}:{spec}")
  model = registry.build(config.model)
  params = jax.eval_shape(lambda b: nn.unbox(model.init(
      {"params": jax.random.key(0), "dropout": jax.random.key(1)}, b)["params"]),
                          registry.batch_spec(config, 1))
  return config, params


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("spec", ["tiny", "tiny,scan=False"])
def test_freezing_modes_follow_the_reference(spec):
  config, params = _abstract_params(spec)
  paths = list(traverse_util.flatten_dict(params, sep="/"))

  def frozen(mode):
    _, f = state_lib.split_frozen(params, model_lib.frozen_patterns(mode))
    return set(traverse_util.flatten_dict(f, sep="/"))

  vision_frozen = {p for p in paths if p.startswith("vision/encoder/")
                   and "/adaptor/" not in p}
  lang_frozen = {p for p in paths if p.startswith("decoder/") and p.split("/")[2] in (
      "self_attention", "self_attention_norm", "mlp", "mlp_norm")}
  assert vision_frozen and lang_frozen
  assert frozen("freeze_lang_vision") == vision_frozen | lang_frozen
  assert frozen("freeze_vision") == vision_frozen
  assert frozen("none") == set()
  trainable = set(paths) - frozen("freeze_lang_vision")
  for part in ("vision/embedder/stem_depth", "vision/embedder/resampler", "vision/pre_norm",
               "vision/encoder/", "decoder/", "output_layer", "word_embedding"):
    assert any(p.startswith(part) for p in trainable), part
  assert all("/adaptor/" in p for p in trainable if p.startswith("vision/encoder/"))
  assert all(p.split("/")[2] in ("cross_attention", "cross_attention_norm", "adaptor")
             for p in trainable if p.startswith("decoder/"))


def test_batchnorm_stem_statistics_stay_frozen_through_a_train_step():
  """expert_stem_norm='batch' with freeze=none: the running mean/var sit on the frozen side
  (no gradient, no optimizer moments, no weight decay) and keep their values bit for bit,
  while the BatchNorms' scale and bias train."""
  from vlm_jax import sharding  # pylint: disable=g-import-not-at-top
  from vlm_jax.train import optimizer, state, step  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(f"{CONFIG}:tiny,experts=depth,stem_norm=batch,freeze=none")
  config.model.update(lm=dict(config.model.lm, num_layers=1), scan_layers=False)
  config.model.vision.update(depth=1, resampler_layers=1)
  config.optimizer.update(warmup_steps=0, schedule="constant")  # a step that moves weights
  model, mesh = registry.build(config.model), sharding.make_mesh(config.mesh)
  rng = np.random.default_rng(0)
  batch = {k: (rng.integers(0, 50, s.shape) if s.dtype == jnp.int32
               else rng.uniform(0.5, 1, s.shape)).astype(s.dtype)
           for k, s in registry.batch_spec(config, 8).items()}
  tx = optimizer.make_optimizer(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules_from_config(config)):
    before = state.StateFactory(model, tx, config, mesh, batch).create(jax.random.key(1))
    after, _ = jax.jit(step.make_train_step(model, tx, config))(before, batch,
                                                                jax.random.key(2))
  stats = {f"vision/embedder/stem_depth/norm_{i}/{s}" for i in range(4) for s in ("mean", "var")}
  flat = lambda tree: {k: np.asarray(v) for k, v in traverse_util.flatten_dict(
      tree, sep="/").items()}
  assert set(flat(before.frozen)) == stats  # freeze=none: only the statistics
  assert not stats & set(flat(before.params))
  for path, value in flat(before.frozen).items():
    np.testing.assert_array_equal(flat(after.frozen)[path], value, err_msg=path)
  for part in ("scale", "bias"):
    path = f"vision/embedder/stem_depth/norm_0/{part}"
    assert not np.array_equal(flat(after.params)[path], flat(before.params)[path]), path


@pytest.mark.parametrize("size,published,frozen_backbones", [
    # Frozen = CLIP ViT resblocks + RoBERTa encoder layers. HF roberta-base has 124,645,632
    # params = embeddings 39,000,576 + pooler 590,592 + 12 layers; roberta-large 355,359,744
    # = 52,000,768 + 1,049,600 + 24 layers. ViT-B/L layers are the same sizes as RoBERTa's.
    ("base", 160e6, 2 * (124_645_632 - 39_000_576 - 590_592)),
    ("large", 360e6, 2 * (355_359_744 - 52_000_768 - 1_049_600)),
])
def test_paper_sizes_trainable_parameters(size, published, frozen_backbones):
  config, params = _abstract_params(size)
  trainable, frozen = state_lib.split_frozen(params, config.frozen)
  assert _count(frozen) == frozen_backbones
  assert abs(_count(trainable) / published - 1) < 0.03, _count(trainable)


def test_flops_match_xla_and_apply_the_frozen_rules():
  config = config_lib.load_config(f"{CONFIG}:tiny")
  config.model.scan_layers = False  # XLA counts a scanned body once
  model = registry.build(config.model)
  spec = registry.batch_spec(config, 2)
  params = jax.eval_shape(lambda b: nn.unbox(model.init(jax.random.key(0), b)["params"]), spec)
  compiled = jax.jit(lambda p, b: model.apply({"params": p}, b)).lower(params, spec).compile()
  analysis = compiled.cost_analysis()
  measured = (analysis[0] if isinstance(analysis, list) else analysis)["flops"] / 2
  result = flops.flops_per_example(config, flops.config_treatment(config),
                                   causal_half=False)
  # XLA also counts element-wise work (norms, activations, resizes); tiny is narrow.
  assert result["forward"] <= measured <= 1.25 * result["forward"], measured / result["forward"]
  parts = result["parts"]
  expected = (2 * (parts["vision_layers"] + parts["decoder_layers"])
              + 3 * (result["forward"] - parts["vision_layers"] - parts["decoder_layers"]))
  assert result["train"] == pytest.approx(expected)
  config.model.freeze = "none"
  assert flops.flops_per_example(config, flops.config_treatment(config))[
      "train"] == pytest.approx(
      3 * flops.flops_per_example(config)["forward"])


# ----------------------------------------------------------------------------------------
# vlm-train on the tiny config
# ----------------------------------------------------------------------------------------
def _train(workdir, steps):
  command = [sys.executable, "-m", "vlm_jax.cli.train", "--config", f"{CONFIG}:tiny",
             "--workdir", str(workdir), f"--config.num_train_steps={steps}",
             "--config.batch_size=8", "--config.log_every_steps=5",
             "--config.checkpoint.every_steps=10", "--config.checkpoint.async_save=False",
             "--config.optimizer.warmup_steps=5", "--config.optimizer.learning_rate=3e-3",
             # constant after warm-up: a 20-step run is the first half of a 40-step run
             "--config.optimizer.schedule=constant", "--num-samples=0"]
  env = {**os.environ, "PYTHONPATH": REPO}
  return subprocess.run(command, check=True, capture_output=True, text=True, timeout=900,
                        env=env)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _checkpointed_state(workdir, step):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(step), "state"))


def test_vlm_train_tiny_learns_keeps_backbones_frozen_and_resumes(tmp_path):
  workdir = tmp_path / "run"
  _train(workdir, 10)
  resumed = _train(workdir, 20)
  assert "Resuming from checkpoint step 10" in resumed.stdout
  straight = tmp_path / "straight"
  _train(straight, 20)
  a, b = _losses(workdir), _losses(straight)
  assert sorted(a) == sorted(b) == [5, 10, 15, 20]
  np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=1e-5)
  assert b[20] < 0.85 * b[5], b
  # Frozen backbone weights: bit-identical to the initialisation after 20 steps (the
  # trainer initialises with split(key(seed)) as (params, dropout) keys).
  config = config_lib.load_config(f"{CONFIG}:tiny")
  model = registry.build(config.model)
  params_key, dropout_key = jax.random.split(jax.random.key(config.seed))
  init = nn.unbox(jax.jit(model.init)({"params": params_key, "dropout": dropout_key},
                                      registry.dummy_batch(config, 1))["params"])
  trainable_init, frozen_init = state_lib.split_frozen(init, config.frozen)
  state = _checkpointed_state(straight, 20)
  assert _count(state["frozen"]) == _count(frozen_init) > 0
  for x, y in zip(jax.tree.leaves(frozen_init), jax.tree.leaves(state["frozen"])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
             zip(jax.tree.leaves(trainable_init), jax.tree.leaves(state["params"])))
