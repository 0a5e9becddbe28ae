"""Flamingo: gates at 0 = bare LM, interleaved-media masking, open-flamingo parity, freezing,
video frames, configs at paper sizes."""
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import builders
from vlm_jax import config as config_lib
from vlm_jax import flops
from vlm_jax import params as state_lib
from vlm_jax.models import flamingo as model_lib
from vlm_jax.models import registry
from vlm_jax.nn import decoder_lm, gated_xattn
from vlm_jax.nn.resampler import PerceiverResampler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_ID, CHUNK_ID = 4, 5
LM = dict(vocab_size=64, width=32, num_layers=4, num_heads=4, mlp_dim=48)
VISION_WIDTH, NUM_LATENTS = 16, 3
TINY = dict(lm=LM, vision=dict(width=VISION_WIDTH, depth=1, num_heads=2, mlp_dim=32,
                                patch_size=8, class_token=True, pre_norm=True,
                                patch_bias=False, mlp_activation="quick_gelu"),
            resampler=dict(num_layers=1, num_latents=NUM_LATENTS, num_heads=2, head_dim=8),
            xattn=dict(num_heads=2, head_dim=8), xattn_group=2, xattn_sublayers=(1,),
            only_attend_immediate=True, new_token_ids=(IMAGE_ID, CHUNK_ID))


def tiny_model(num_frames=0, **fields):
  config = dict(TINY, **fields)
  config["resampler"] = dict(config["resampler"], num_frames=num_frames)
  return builders.build("flamingo", **config)
IMAGE, LENGTH, MEDIA = 16, 12, 3


def _batch(seed=0, positions=((1, 6, 0), (2, 0, 0)), present=((1, 1, 0), (1, 0, 0))):
  k1, k2 = jax.random.split(jax.random.key(seed))
  tokens = jax.random.randint(k1, (2, LENGTH), 6, 64)
  positions, present = jnp.array(positions, jnp.int32), jnp.array(present, jnp.float32)
  for b in range(2):
    for n in range(MEDIA):
      if present[b, n]:
        tokens = tokens.at[b, positions[b, n]].set(IMAGE_ID)
  return {"images": jax.random.uniform(k2, (2, MEDIA, IMAGE, IMAGE, 3), minval=-1, maxval=1),
          "image_mask": present, "image_positions": positions, "tokens": tokens,
          "token_mask": jnp.ones((2, LENGTH))}


def _init(model, batch):
  return nn.unbox(jax.jit(model.init)(jax.random.key(0), batch))["params"]


def _set_gates(params, value):
  flat = traverse_util.flatten_dict(params, sep="/")
  flat = {k: (jnp.full_like(v, value) if k.endswith("_gate") else v) for k, v in flat.items()}
  return traverse_util.unflatten_dict(flat, sep="/")


@pytest.fixture(scope="module")
def tiny():
  model = tiny_model()
  return model, _init(model, _batch())


# ----------------------------------------------------------------------------------------
# Gates at 0: exactly the bare LM
# ----------------------------------------------------------------------------------------
def test_gates_at_zero_give_exactly_the_bare_lm(scan=True):
  model = tiny_model(scan_layers=scan)
  batch = _batch()
  params = _init(model, batch)
  flat = traverse_util.flatten_dict(params, sep="/")
  gates = [v for k, v in flat.items() if k.endswith("_gate")]
  assert gates and all(np.all(np.asarray(g) == 0) for g in gates)  # initialised at 0
  # A plain LM (one layer per scan step) whose weights are loaded into the grouped stack.
  bare = decoder_lm.DecoderLM(**LM, scan_layers=scan)
  bare_params = nn.unbox(bare.init(jax.random.key(1), batch["tokens"]))["params"]
  bare_params = jax.tree.map(lambda a: a + 0.1, bare_params)  # norms' bias != 0 etc.
  # The new tokens' embeddings are part of the LM the model must reproduce.
  table = params["new_token_embedding"]
  bare_params["embed"]["embedding"] = bare_params["embed"]["embedding"].at[
      jnp.array([IMAGE_ID, CHUNK_ID])].set(table)
  lm = dict(bare_params)
  if scan:
    lm["layers"] = {"layers": decoder_lm.group_layer_params(bare_params["layers"]["layers"], 2)}
  else:
    lm["layers"] = {f"layers_{u}": {f"sublayer_{i}": bare_params["layers"][f"layers_{2 * u + i}"]
                                    for i in range(2)} for u in range(2)}
  for unit, xattn in ((k, v) for k, v in params["lm"]["layers"].items()):
    lm["layers"][unit]["xattn_1"] = xattn["xattn_1"]
  params = dict(params, lm=lm)
  # Eager (op by op): two different jitted programs may fuse the same LM differently.
  expected = bare.apply({"params": bare_params}, batch["tokens"])
  got = model.apply({"params": params}, batch)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
  # ...and opening the gates changes them (the blocks are wired in).
  opened = jax.jit(model.apply)({"params": _set_gates(params, 0.5)}, batch)
  assert not np.allclose(np.asarray(opened), np.asarray(expected), atol=1e-3)


# ----------------------------------------------------------------------------------------
# Masking: the attended set of every token
# ----------------------------------------------------------------------------------------
def _visible(positions, present, length, only_immediate=True):
  out = gated_xattn.media_visibility(jnp.array([positions], jnp.int32),
                                     jnp.array([present], jnp.float32), length, only_immediate)
  return [set(np.flatnonzero(row).tolist()) for row in np.asarray(out[0])]


def test_text_before_the_first_image_sees_nothing():
  sets = _visible([3, 0], [1, 0], 6)
  assert sets == [set(), set(), set(), {0}, {0}, {0}]  # the <image> token sees its own image


def test_two_images_with_text_between():
  sets = _visible([1, 4], [1, 1], 7)
  assert sets == [set(), {0}, {0}, {0}, {1}, {1}, {1}]
  all_previous = _visible([1, 4], [1, 1], 7, only_immediate=False)
  assert all_previous == [set(), {0}, {0}, {0}, {0, 1}, {0, 1}, {0, 1}]


def test_padded_image_slots_are_never_attended():
  # Slot 1 is padding whose position (0) would otherwise make it visible everywhere.
  sets = _visible([2, 0, 0], [1, 0, 0], 5)
  assert sets == [set(), set(), {0}, {0}, {0}]
  assert _visible([2, 0, 0], [1, 0, 0], 5, only_immediate=False) == sets


def test_a_document_with_no_image_sees_nothing():
  assert _visible([0, 0], [0, 0], 4) == [set()] * 4
  assert _visible([0, 0], [0, 0], 4, only_immediate=False) == [set()] * 4


def test_model_mask_matches_open_flamingo_text_time():
  """The same sets as OpenFlamingo's rule: text_time = cumsum(is <image>); media
  text_time - 1 (immediate), media < text_time (all previous)."""
  rng = np.random.default_rng(0)
  for _ in range(20):
    is_image = rng.random(16) < 0.25
    is_image[np.flatnonzero(is_image)[MEDIA:]] = False  # at most MEDIA images
    positions = np.flatnonzero(is_image)
    present = np.zeros(MEDIA)
    present[:len(positions)] = 1
    padded = np.zeros(MEDIA, np.int32)
    padded[:len(positions)] = positions
    text_time = np.cumsum(is_image)
    for immediate in (True, False):
      sets = _visible(padded, present, 16, immediate)
      expected = [({t - 1} if t else set()) if immediate else set(range(t)) for t in text_time]
      assert sets == expected


def test_cross_attention_output_is_zero_before_the_first_image_and_never_nan():
  block = gated_xattn.GatedCrossAttentionDense(num_heads=2, head_dim=4)
  x = jax.random.normal(jax.random.key(0), (1, 5, 8))
  media = jax.random.normal(jax.random.key(1), (1, 2 * 3, 6))
  mask = gated_xattn.media_attention_mask(jnp.array([[2, 0]]), jnp.array([[1, 0]]), 5, 3)
  params = nn.unbox(block.init(jax.random.key(2), x, media, mask))["params"]
  params = dict(params, attn_gate=jnp.float32(1.0))  # attention open, FFW gate still 0
  apply = jax.jit(block.apply)
  out = apply({"params": params}, x, media, mask)
  assert np.all(np.isfinite(np.asarray(out)))
  np.testing.assert_array_equal(np.asarray(out[:, :2]), np.asarray(x[:, :2]))  # exact zero
  assert np.abs(np.asarray(out[:, 2:] - x[:, 2:])).min() > 0
  # Padded media tokens (slot 1) never change any output, even huge ones.
  changed = media.at[:, 3:].set(1e4)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(
      apply({"params": params}, x, changed, mask)))


def test_logits_depend_only_on_the_attended_image(tiny):
  model, params = tiny
  params = _set_gates(params, 1.0)
  batch = _batch()  # row 0: images at 1 and 6; row 1: one image at 2, slots 1-2 padding
  apply = jax.jit(model.apply)
  base = np.asarray(apply({"params": params}, batch))
  changed = dict(batch, images=batch["images"].at[0, 1].multiply(-1.0))  # row 0, image 1
  out = np.asarray(apply({"params": params}, changed))
  np.testing.assert_array_equal(out[0, :6], base[0, :6])  # before image 1's <image> token
  assert np.abs(out[0, 6:] - base[0, 6:]).max() > 1e-4
  np.testing.assert_array_equal(out[1], base[1])
  padded = dict(batch, images=batch["images"].at[1, 1:].set(0.3))  # row 1's padded slots
  np.testing.assert_array_equal(np.asarray(apply({"params": params}, padded)), base)


# ----------------------------------------------------------------------------------------
# Parity with open-flamingo (PyTorch, CPU)
# ----------------------------------------------------------------------------------------
def _open_flamingo_helpers():
  """open_flamingo/src/helpers.py by file path (the package __init__ imports open_clip)."""
  spec = importlib.util.find_spec("open_flamingo")
  assert spec is not None, "open-flamingo is a test dependency (see setup.py [test])"
  path = os.path.join(os.path.dirname(spec.origin), "src", "helpers.py")
  module_spec = importlib.util.spec_from_file_location("open_flamingo_helpers", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def _ln(sd, prefix):
  return {"scale": sd[prefix + ".weight"], "bias": sd[prefix + ".bias"]}


def _attention(sd, prefix, q_name, kv_name, heads, width_q, width_kv):
  head_dim = sd[prefix + q_name + ".weight"].shape[0] // heads
  wk, wv = np.split(sd[prefix + kv_name + ".weight"], 2, axis=0)
  to_heads = lambda w, d: w.T.reshape(d, heads, head_dim)
  return {"query": {"kernel": to_heads(sd[prefix + q_name + ".weight"], width_q)},
          "key": {"kernel": to_heads(wk, width_kv)}, "value": {"kernel": to_heads(wv, width_kv)},
          "out": {"kernel": sd[prefix + "to_out.weight"].T.reshape(heads, head_dim, width_q)}}


def test_resampler_matches_open_flamingo():
  import torch  # pylint: disable=g-import-not-at-top  (test extra; never skipped)
  helpers = _open_flamingo_helpers()
  torch.manual_seed(0)
  dim, depth, heads, head_dim, latents, frames = 32, 2, 4, 8, 5, 3
  ref = helpers.PerceiverResampler(dim=dim, depth=depth, dim_head=head_dim, heads=heads,
                                   num_latents=latents, max_num_frames=frames, ff_mult=4).eval()
  with torch.no_grad():  # non-trivial norms
    for name, p in ref.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  x = torch.randn(2, 1, frames, 7, dim)  # b, T media, F frames, v tokens, d
  with torch.no_grad():
    expected = ref(x).numpy()[:, 0]
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  params = {"latents": sd["latents"], "time_embedding": sd["frame_embs"],
            "final_norm": _ln(sd, "norm")}
  for i in range(depth):
    a, f = f"layers.{i}.0.", f"layers.{i}.1."
    params[f"layers_{i}"] = {
        "inputs_norm": _ln(sd, a + "norm_media"), "latents_norm": _ln(sd, a + "norm_latents"),
        "attention": _attention(sd, a, "to_q", "to_kv", heads, dim, dim),
        "mlp_norm": _ln(sd, f + "0"),
        "mlp": {"wi": {"kernel": sd[f + "1.weight"].T}, "wo": {"kernel": sd[f + "3.weight"].T}}}
  ours = PerceiverResampler(num_latents=latents, num_layers=depth, num_heads=heads,
                            head_dim=head_dim, num_frames=frames)
  shapes = jax.eval_shape(ours.init, jax.random.key(0), jnp.zeros((2, frames, 7, dim)))
  assert jax.tree.structure(nn.unbox(shapes)["params"]) == jax.tree.structure(params)
  got = ours.apply({"params": params}, jnp.asarray(x.numpy()[:, 0]))
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("immediate", [True, False])
def test_gated_cross_attention_block_matches_open_flamingo(immediate):
  import torch  # pylint: disable=g-import-not-at-top  (test extra; never skipped)
  helpers = _open_flamingo_helpers()
  torch.manual_seed(1)
  dim, dim_visual, heads, head_dim, media, latents, length = 24, 16, 3, 8, 2, 4, 9
  ref = helpers.GatedCrossAttentionBlock(dim=dim, dim_visual=dim_visual, dim_head=head_dim,
                                         heads=heads, ff_mult=4,
                                         only_attend_immediate_media=immediate).eval()
  with torch.no_grad():
    ref.attn_gate.fill_(0.7)
    ref.ff_gate.fill_(-0.4)
    for name, p in ref.named_parameters():
      if "norm" in name or name.startswith("ff.0"):
        p.add_(0.1 * torch.randn_like(p))
  x = torch.randn(2, length, dim)
  visual = torch.randn(2, media, latents, dim_visual)
  is_image = torch.zeros(2, length, dtype=torch.bool)
  is_image[0, [2, 5]] = True  # row 0: two images; row 1: one image at token 4
  is_image[1, 4] = True
  with torch.no_grad():
    expected = ref(x, visual, media_locations=is_image).numpy()
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  params = {"attn_gate": sd["attn_gate"][0], "ff_gate": sd["ff_gate"][0],
            "attention_norm": _ln(sd, "attn.norm"),
            "attention": _attention(sd, "attn.", "to_q", "to_kv", heads, dim, dim_visual),
            "mlp_norm": _ln(sd, "ff.0"),
            "mlp": {"wi": {"kernel": sd["ff.1.weight"].T}, "wo": {"kernel": sd["ff.3.weight"].T}}}
  block = gated_xattn.GatedCrossAttentionDense(num_heads=heads, head_dim=head_dim)
  # Row 1 has one real image; its second slot is padding (OpenFlamingo never reaches it
  # because text_time stays 1; ours must not attend it either).
  positions = jnp.array([[2, 5], [4, 0]], jnp.int32)
  present = jnp.array([[1, 1], [1, 0]], jnp.float32)
  mask = gated_xattn.media_attention_mask(positions, present, length, latents, immediate)
  got = block.apply({"params": params}, jnp.asarray(x.numpy()),
                    jnp.asarray(visual.numpy()).reshape(2, media * latents, dim_visual), mask)
  if immediate:
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=1e-5)
  else:
    # With all-previous attention, OpenFlamingo does not zero tokens before any image: they
    # attend uniformly over every media token (a known quirk). Ours get exact zeros from
    # the attention there, so compare the rows from the first image on.
    first = [2, 4]
    for b in range(2):
      np.testing.assert_allclose(np.asarray(got[b, first[b]:]), expected[b, first[b]:],
                                 atol=1e-5, rtol=1e-5)
      assert np.abs(np.asarray(got[b, :first[b]]) - expected[b, :first[b]]).max() > 1e-4


# ----------------------------------------------------------------------------------------
# Freezing: what is differentiated
# ----------------------------------------------------------------------------------------
def _loss(model, batch):
  targets = jnp.roll(batch["tokens"], -1, axis=1)
  def fn(trainable, frozen):
    logits = model.apply({"params": state_lib.merge_params(trainable, frozen)}, batch)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))
  return fn


def test_only_resampler_gated_blocks_and_new_tokens_are_differentiated(tiny):
  model, params = tiny
  params = _set_gates(params, 0.5)
  trainable, frozen = state_lib.split_frozen(params, model_lib.frozen_patterns())
  keys = set(traverse_util.flatten_dict(trainable, sep="/"))
  assert {k.split("/")[0] for k in keys} == {"resampler", "lm", "new_token_embedding"}
  assert all("/xattn_" in k for k in keys if k.startswith("lm/"))
  assert any(k.endswith("attn_gate") for k in keys)
  frozen_keys = set(traverse_util.flatten_dict(frozen, sep="/"))
  assert not any("/xattn_" in k for k in frozen_keys)
  assert any(k.startswith("vision/") for k in frozen_keys)
  assert any(k.startswith("lm/embed/") for k in frozen_keys)
  batch = _batch()
  grads, frozen_grads = jax.jit(jax.grad(_loss(model, batch), argnums=(0, 1)))(trainable,
                                                                                 frozen)
  assert set(traverse_util.flatten_dict(grads, sep="/")) == keys  # the gradient tree
  assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads))
  # Through the frozen parts: the LM passes gradients down (4N), the ViT is behind a
  # stop-gradient (2N: exactly zero gradient, nothing to differentiate). (The training
  # step differentiates the trainable tree only; this probe shows what would flow.)
  frozen_grads = traverse_util.flatten_dict(frozen_grads, sep="/")
  assert all(np.all(np.asarray(g) == 0) for k, g in frozen_grads.items()
             if k.startswith("vision/"))
  assert any(np.abs(np.asarray(g)).max() > 0 for k, g in frozen_grads.items()
             if k.startswith("lm/"))


# ----------------------------------------------------------------------------------------
# Video: frames with time embeddings
# ----------------------------------------------------------------------------------------
def test_video_media_use_time_embeddings_and_frame_order():
  model = tiny_model(num_frames=3)
  images = _batch()["images"]  # three different frames per item: [B, N, F=3, H, W, C]
  video = jnp.stack([images, images[..., ::-1, :, :], -images], 2)
  params = nn.unbox(jax.jit(lambda k, im: model.init(k, im, method="encode_media"))(
      jax.random.key(0), video))["params"]
  assert params["resampler"]["time_embedding"].shape == (3, VISION_WIDTH)
  encode = jax.jit(lambda p, im: model.apply({"params": p}, im, method="encode_media"))
  tokens = encode(params, video)
  assert tokens.shape == (2, MEDIA, NUM_LATENTS, VISION_WIDTH)
  swapped = encode(params, video[:, :, ::-1])  # frame order matters through time embeddings
  assert np.abs(np.asarray(tokens - swapped)).max() > 1e-4
  with pytest.raises(ValueError, match="num_frames=3"):
    encode(params, jnp.concatenate([video, video[:, :, :1]], axis=2))


# ----------------------------------------------------------------------------------------
# Configs: every size builds; paper layouts by eval_shape; FLOPs vs XLA
# ----------------------------------------------------------------------------------------
SIZES = ("tiny", "bench", "3b", "9b", "80b", "of3b", "of4b", "of9b")
# (total, xattn blocks) by jax.eval_shape; docs/models.md compares them with the papers.
EXPECTED = {"3b": (3_112_636_976, 24), "9b": (8_578_968_080, 8), "80b": (72_486_803_992, 12),
            "of3b": (2_558_548_016, 24), "of4b": (4_039_813_152, 16),
            "of9b": (8_131_309_584, 8)}


def _abstract_params(config):
  model = registry.build(config.model)
  return nn.unbox(jax.eval_shape(lambda b: model.init(jax.random.key(0), b)["params"],
                                 registry.batch_spec(config, 1)))


@pytest.mark.parametrize("size", SIZES)
def test_configs_build_and_freeze_what_exists(size):
  config = config_lib.load_config(f"configs/flamingo.py:{size}")
  params = _abstract_params(config)
  assert not state_lib.unmatched_patterns(params, config.frozen)
  flat = traverse_util.flatten_dict(params, sep="/")
  blocks = {k.split("/xattn_")[0] + "/xattn_" + k.split("/xattn_")[1].split("/")[0]
            for k in flat if "/xattn_" in k}
  gate = next(v for k, v in flat.items() if k.endswith("attn_gate"))
  num_blocks = len(blocks) * (gate.shape[0] if gate.ndim else 1)  # scanned: [units]
  assert num_blocks == (config.model.lm.num_layers // config.model.xattn_group
                        * len(config.model.xattn_sublayers))
  if size in EXPECTED:
    total, expected_blocks = EXPECTED[size]
    assert sum(v.size for v in flat.values()) == total
    assert num_blocks == expected_blocks
  # OpenFlamingo's resampler (dim 1024) has 63,019,008 parameters (DESIGN.md).
  if size.startswith("of"):
    assert sum(v.size for k, v in flat.items() if k.startswith("resampler/")) == 63_019_008


def test_config_options_and_errors():
  config = config_lib.load_config("configs/flamingo.py:tiny,frames=4,immediate=False")
  assert config.model.resampler.num_frames == config.data.frames_per_media == 4
  assert config.model.only_attend_immediate is False
  assert registry.batch_spec(config, 2)["images"].shape == (2, 4, 4, 64, 64, 3)
  with pytest.raises(ValueError, match="flamingo size"):
    config_lib.load_config("configs/flamingo.py:huge")
  with pytest.raises(ValueError, match="key=value"):
    config_lib.load_config("configs/flamingo.py:tiny,frame=2")
  with pytest.raises(config_lib.ConfigError, match="xattn_sublayers"):
    tiny_model(xattn_sublayers=(2,))


@pytest.mark.parametrize("arg", ["tiny", "tiny,packed=True"])  # packed: all 8 image slots
def test_analytic_flops_match_xla_and_treat_frozen_parts(arg):
  config = config_lib.load_config(f"configs/flamingo.py:{arg}")
  config.model.scan_layers = False  # XLA counts a scanned loop body once
  model = registry.build(config.model)
  spec = registry.batch_spec(config, 2)
  params = _abstract_params(config)
  compiled = jax.jit(lambda p, b: model.apply({"params": p}, b)).lower(params, spec).compile()
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  measured = analysis["flops"] / 2
  result = flops.flops_per_example(config, flops.config_treatment(config), causal_half=False)
  # XLA adds element-wise work (norms, GELU, softmax, masks) on top of matmuls.
  assert result["forward"] <= measured <= 1.12 * result["forward"], measured / result["forward"]
  parts = result["parts"]
  assert set(parts) == {"vision", "resampler", "xattn", "lm", "logits"}
  expected = (parts["vision"] + 2 * (parts["lm"] + parts["logits"])
              + 3 * (parts["resampler"] + parts["xattn"]))
  assert result["train"] == pytest.approx(expected)


# ----------------------------------------------------------------------------------------
# Training on the interleaved mixture (the loop of tests/test_train.py)
# ----------------------------------------------------------------------------------------
def _train_config(steps, **overrides):
  fields = {"batch_size": "4", "num_train_steps": str(steps), "log_every_steps": "1",
            "checkpoint.every_steps": "8", "checkpoint.async_save": "False",
            "optimizer.schedule": "constant", "optimizer.warmup_steps": "2",
            "optimizer.learning_rate": "6e-3", "data.sequence_length": "64",
            "mesh.shape": "(1, 1, 1)"}
  fields.update(overrides)
  return config_lib.load_config(os.path.join(REPO, "configs", "flamingo.py") + ":tiny",
                                list(fields.items()))


def _losses(workdir):
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_tiny_trains_gates_open_frozen_parts_stay_and_resume_is_exact(tmp_path):
  from vlm_jax.train import loop  # pylint: disable=g-import-not-at-top
  one = jax.devices()[:1]
  trainer = loop.Trainer(_train_config(16), str(tmp_path / "straight"), devices=one)
  before = jax.device_get(trainer.initial_state())
  after = jax.device_get(trainer.run())
  losses = _losses(tmp_path / "straight")
  first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in (14, 15, 16)])
  assert last < 0.7 * first, losses
  gates = [v for k, v in traverse_util.flatten_dict(after.params, sep="/").items()
           if k.endswith("_gate")]
  assert gates and all(np.abs(g).min() > 1e-4 for g in gates)  # moved away from 0
  # Frozen: bit-identical, and the optimizer holds moments for trainable params only.
  for x, y in zip(jax.tree.leaves(before.frozen), jax.tree.leaves(after.frozen)):
    np.testing.assert_array_equal(x, y)
  mu = traverse_util.flatten_dict(after.opt_state[1][0].mu, sep="/")
  assert set(mu) == set(traverse_util.flatten_dict(after.params, sep="/"))
  assert not any(k.startswith("vision/") for k in mu)
  # Resume: 8 steps, then a new Trainer continues to 16 from the step-8 checkpoint (train
  # state and data iterator), giving the losses of the uninterrupted run.
  loop.Trainer(_train_config(8), str(tmp_path / "resumed"), devices=one).run()
  loop.Trainer(_train_config(16), str(tmp_path / "resumed"), devices=one).run()
  resumed = _losses(tmp_path / "resumed")
  assert sorted(resumed) == list(range(1, 17))
  np.testing.assert_allclose([resumed[s] for s in range(9, 17)],
                             [losses[s] for s in range(9, 17)], rtol=1e-5)
