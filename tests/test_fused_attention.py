"""Fused attention (nn/fused_attention.py) against the XLA path, on CPU: Pallas splash attention
in interpret mode, and the cuDNN code path run with jax.nn.dot_product_attention's XLA
implementation (no GPU here). Forward and gradients within 1e-5 (f32) for every mask kind
the families use; fully masked rows output exactly zero with finite gradients."""
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import config as config_lib
from vlm_jax import sharding
from vlm_jax.models import registry
from vlm_jax.nn import attention, decoder_lm, fused_attention, gated_xattn, segment_mask

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, N, H = 2, 4, 32
SCALE = H ** -0.5
TOL = dict(rtol=1e-5, atol=1e-5)


def _valid(rows, length):
  """[B, length] 0/1 from per-row (start, stop) of the valid span."""
  return jnp.asarray([[int(start <= i < stop) for i in range(length)] for start, stop in rows])


def _media_mask(length, segment_ids=None):
  # row 0: images at tokens 10 and 70 (tokens 0-9 see nothing); row 1: one image at 0, the
  # second slot absent. 3 items x 16 visual tokens.
  return gated_xattn.media_segment_mask(jnp.array([[10, 70, 0], [0, 5, 0]]),
                                        jnp.array([[1, 1, 0], [1, 0, 0]]), length, 16,
                                        segment_ids)


# name: (query length, key length, key/value heads, mask builder (None: no mask))
CASES = {
    # ViT self-attention: no mask; 137 tokens (odd, like a class token + a square grid) are
    # padded to splash's blocks and to cuDNN's even lengths
    "none_self": (137, 137, N, lambda: None),
    # CogAgent's high-res cross-attention: no mask, T != S
    "none_cross": (41, 151, N, lambda: None),
    # decoder LM: causal + key padding, grouped-query; row 1 is left-padded, so its first
    # rows see nothing
    "causal_padding": (136, 136, 2, lambda: segment_mask.causal(136, _valid([(0, 100),
                                                                              (7, 136)], 136))),
    # SimVLM encoder (bidirectional over [image ; prefix]): key padding; row 1 all padding
    "bidirectional_padding": (136, 136, N, lambda: segment_mask.key_padding(
        _valid([(0, 90), (0, 0)], 136), 136)),
    # encoder-decoder cross-attention (SimVLM, Prismer decoders): encoder padding, T != S
    "cross_padding": (40, 150, N, lambda: segment_mask.key_padding(
        _valid([(0, 150), (20, 130)], 150), 40)),
    # packed rows (issue 24 packing): segments 1, 2, 3 then padding (0), causal
    "packed_causal": (136, 136, N, lambda: segment_mask.SegmentMask(
        *(jnp.asarray([[1] * 50 + [2] * 60 + [0] * 26, [1] * 3 + [2] * 120 + [3] * 13])
          for _ in range(2)), causal=True)),
    # Flamingo media visibility: tokens before the first image see nothing
    "flamingo_media": (136, 48, N, lambda: _media_mask(136)),
    # packed Flamingo rows: documents 1 (tokens 0-59) and 2 (60-135); document 2's text
    # before its own first image (token 70) sees nothing, not document 1's images
    "flamingo_media_packed": (136, 48, N, lambda: _media_mask(
        136, jnp.asarray([[1] * 60 + [2] * 76, [1] * 136]))),
    # packed cross-attention (CogAgent high-res, Prismer decoder): a token sees only its own
    # example's slot of 50 keys; padding tokens (0) see only the unused slot (0)
    "packed_cross": (40, 150, N, lambda: segment_mask.packed_cross(
        jnp.asarray([[1] * 15 + [2] * 20 + [0] * 5, [1] * 40]),
        jnp.asarray([[1, 2, 0], [1, 0, 0]]), 50)),
}


def _inputs(q_len, kv_len, kv_heads, seed=0):
  kq, kk, kv, kw = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(kq, (B, q_len, N, H))
  k = jax.random.normal(kk, (B, kv_len, kv_heads, H))
  v = jax.random.normal(kv, (B, kv_len, kv_heads, H))
  cotangent = jax.random.normal(kw, (B, q_len, N, H))  # gradients of order 1
  return q, k, v, cotangent


def _value_and_grads(fn, q, k, v, cotangent):
  out, vjp = jax.vjp(fn, q, k, v)
  return out, vjp(cotangent)


def _max_diffs(got, want):
  return [float(jnp.abs(a - b).max()) for a, b in zip(got, want)]


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("implementation", ["splash", "cudnn"])
def test_forward_and_gradients_match_xla(name, implementation):
  q_len, kv_len, kv_heads, make_mask = CASES[name]
  mask = make_mask()
  q, k, v, cotangent = _inputs(q_len, kv_len, kv_heads)
  xla = jax.jit(lambda q, k, v: fused_attention.xla_attention(q, k, v, mask, scale=SCALE))
  if implementation == "splash":
    fused = lambda q, k, v: fused_attention.splash_attention(q, k, v, mask, scale=SCALE)
  else:  # the cuDNN code path, with XLA's implementation of jax.nn.dot_product_attention
    fused = lambda q, k, v: fused_attention.cudnn_attention(q, k, v, mask, scale=SCALE,
                                                            implementation="xla")
  want, want_grads = _value_and_grads(xla, q, k, v, cotangent)
  got, got_grads = jax.jit(lambda *a: _value_and_grads(fused, *a))(q, k, v, cotangent)
  print(f"{name} {implementation}: max |diff| out {float(jnp.abs(got - want).max()):.2e}, "
        "dq dk dv " + " ".join(f"{d:.2e}" for d in _max_diffs(got_grads, want_grads))
        + " max grads " + " ".join(f"{float(jnp.abs(w).max()):.2e}" for w in want_grads))
  np.testing.assert_allclose(got, want, **TOL)
  for g, w in zip(got_grads, want_grads):
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, w, **TOL)
  if mask is not None:  # fully masked rows: exactly zero output, no gradient to their query
    empty = ~np.asarray(mask.with_batch(B).row_valid())
    np.testing.assert_array_equal(np.asarray(got)[empty], 0.0)
    np.testing.assert_array_equal(np.asarray(got_grads[0])[empty], 0.0)


def test_splash_under_a_mesh_splits_batch_and_heads_and_matches_xla():
  """The kernel runs per device (shard_map) on the batch and heads the rules shard."""
  config = config_lib.base_config()
  config.mesh.shape = (2, 2, 2)  # data, fsdp, tensor: batch over 4, heads over 2
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:8])
  rules = sharding.rules_from_config(config)
  q_len, kv_len, kv_heads, make_mask = CASES["causal_padding"]
  mask = make_mask()
  q, k, v, cotangent = _inputs(q_len, kv_len, kv_heads)
  grow = lambda x: jnp.concatenate([x, x[::-1]])  # batch 4, one example per batch shard
  q, k, v, cotangent = map(grow, (q, k, v, cotangent))
  mask = segment_mask.SegmentMask(grow(mask.q_segment_ids), grow(mask.kv_segment_ids), True)
  xla = lambda q, k, v: fused_attention.xla_attention(q, k, v, mask, scale=SCALE)
  fused = lambda q, k, v: fused_attention.splash_attention(q, k, v, mask, scale=SCALE)
  want, want_grads = _value_and_grads(xla, q, k, v, cotangent)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    lowered = jax.jit(lambda *a: _value_and_grads(fused, *a)).lower(q, k, v, cotangent)
    got, got_grads = lowered.compile()(q, k, v, cotangent)
  assert "shard_map" in lowered.as_text() or "sdy.manual_computation" in lowered.as_text()
  np.testing.assert_allclose(got, want, **TOL)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, **TOL)


def test_cases_cover_fully_masked_rows():
  for name in ("causal_padding", "bidirectional_padding", "flamingo_media",
               "flamingo_media_packed"):
    assert not bool(CASES[name][3]().with_batch(B).row_valid().all()), name


def test_factored_masks_equal_the_dense_masks_they_replace():
  valid = _valid([(0, 5), (2, 8)], 8)
  np.testing.assert_array_equal(
      segment_mask.causal(8, valid).dense(),
      jnp.broadcast_to(attention.causal_mask(8) & attention.padding_mask(None, valid),
                       (2, 1, 8, 8)))
  np.testing.assert_array_equal(segment_mask.key_padding(valid, 3).dense(),
                                jnp.broadcast_to(attention.padding_mask(None, valid),
                                                 (2, 1, 3, 8)))
  positions, present = jnp.array([[10, 70, 0], [0, 5, 0]]), jnp.array([[1, 1, 0], [1, 0, 0]])
  np.testing.assert_array_equal(
      gated_xattn.media_segment_mask(positions, present, 136, 16).dense(),
      gated_xattn.media_attention_mask(positions, present, 136, 16, only_immediate=True))


def test_layer_gradients_wrt_params_and_inputs_match_xla():
  q_len, kv_len, _, make_mask = CASES["cross_padding"]
  mask = make_mask()
  x = jax.random.normal(jax.random.key(1), (B, q_len, 24))
  memory = jax.random.normal(jax.random.key(2), (B, kv_len, 24))
  layers = {impl: attention.MultiHeadAttention(num_heads=N, head_dim=H, attention_impl=impl)
            for impl in ("xla", "splash")}
  params = layers["xla"].init(jax.random.key(0), x, memory, mask)["params"]
  def loss(impl, params, x, memory):
    out = layers[impl].apply({"params": params}, x, memory, mask)
    return jnp.sum(out * jnp.sin(jnp.arange(out.size).reshape(out.shape))) / out.size
  want = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2))(params, x, memory)
  got = jax.jit(jax.grad(lambda *a: loss("splash", *a), argnums=(0, 1, 2)))(params, x, memory)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, **TOL)


def test_dense_masks_decoding_and_bias_fall_back_to_xla_with_the_reason(caplog):
  """PrefixLM in one stack has no factored form: splash runs it on XLA (identical output)."""
  length = 12
  flags = jnp.asarray([[0] * 4 + [1] * 8, [0] * 7 + [1] * 5])
  mask = decoder_lm.prefix_lm_mask(flags)
  q, k, v, _ = _inputs(length, length, N)
  want = fused_attention.xla_attention(q, k, v, mask, scale=SCALE)
  with caplog.at_level(logging.INFO):
    got = fused_attention.dot_product_attention(q, k, v, mask, scale=SCALE,
                                                implementation="splash", name="prefix_lm")
    fused_attention.dot_product_attention(q, k, v, None, jnp.ones((N, length, length)),
                                          scale=SCALE, implementation="splash", name="t5")
    fused_attention.dot_product_attention(q, k, v, None, scale=SCALE, implementation="cudnn",
                                          name="f32")
    fused_attention.dot_product_attention(q[:, :1], k, v, None, scale=SCALE,
                                          implementation="splash", decode=True, name="step")
  np.testing.assert_array_equal(got, want)
  log = caplog.text
  assert "prefix_lm: splash -> xla: a dense boolean mask" in log
  assert "t5: splash -> xla: a logits bias" in log
  assert "f32: cudnn -> xla: float32 inputs" in log
  assert "step: splash -> xla: decode=True" in log


def test_unknown_implementation_names_the_config_field():
  q, k, v, _ = _inputs(4, 4, N)
  with pytest.raises(ValueError, match=r"config.model.attention_impl='flash'"):
    fused_attention.dot_product_attention(q, k, v, scale=SCALE, implementation="flash")


# ---- families: the config field reaches every attention, and the kernels change nothing -----
def _family(name, implementation):
  config = config_lib.load_config_file(os.path.join(REPO, f"configs/{name}.py:tiny"))
  config.model.attention_impl = implementation
  return registry.build(config.model), registry.batch_spec(config, 2)


def _realistic_batch(name, spec):
  """Random tokens and pixels, padding at the end of row 1, Flamingo's images at tokens 1,
  6, 11, ... (so tokens before the first see nothing)."""
  keys = iter(jax.random.split(jax.random.key(5), len(spec)))
  def make(key, s):
    if key in ("tokens", "targets", "prefix_tokens"):
      return jax.random.randint(next(keys), s.shape, 6, 64).astype(s.dtype)
    if key in ("token_mask", "prefix_mask", "loss_mask"):
      return jnp.ones(s.shape, s.dtype).at[1, -3:].set(0)
    if key == "image_positions" and name == "flamingo":
      return jnp.broadcast_to(1 + 5 * jnp.arange(s.shape[1]), s.shape).astype(s.dtype)
    if "mask" in key or key == "loss_weight":
      return jnp.ones(s.shape, s.dtype)
    if jnp.issubdtype(s.dtype, jnp.floating):
      return jax.random.uniform(next(keys), s.shape, s.dtype, -1, 1)
    return jnp.zeros(s.shape, s.dtype)
  return {key: make(key, s) for key, s in spec.items()}


@pytest.mark.parametrize("name", ["simvlm", "flamingo", "cogagent", "minigpt_v2", "prismer"])
def test_every_family_attention_takes_the_kernel(name, caplog):
  model, spec = _family(name, "splash")
  batch = _realistic_batch(name, spec)
  impls = {}
  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, attention.MultiHeadAttention):
      impls["/".join(context.module.path)] = context.module.attention_impl
    return next_fun(*args, **kwargs)
  with caplog.at_level(logging.INFO), nn.intercept_methods(record):
    jax.eval_shape(model.init, jax.random.key(0), batch)
  # Perceiver resamplers (64 latent queries, small scores) stay on XLA by design.
  fused = {path: impl for path, impl in impls.items() if "resampler" not in path}
  assert fused and set(fused.values()) == {"splash"}, impls
  assert "-> xla" not in caplog.text  # every training-forward mask has the factored form


@pytest.mark.parametrize("name", ["simvlm", "flamingo"])
def test_family_loss_and_gradients_match_xla(name):
  """SimVLM: encoder key padding, causal decoder, padded cross-attention; Flamingo: causal LM
  with padding, media visibility (tokens before the first image see nothing), ViT."""
  (xla_model, spec), (splash_model, _) = _family(name, "xla"), _family(name, "splash")
  batch = _realistic_batch(name, spec)
  params = nn.unbox(jax.jit(xla_model.init)(jax.random.key(0), batch))["params"]
  def loss(model, params):
    logits = model.apply({"params": params}, batch)
    weights = jnp.sin(jnp.arange(logits.size).reshape(logits.shape))
    return jnp.sum(logits * weights) / logits.shape[0] / logits.shape[1]
  want = jax.jit(jax.value_and_grad(lambda p: loss(xla_model, p)))(params)
  got = jax.jit(jax.value_and_grad(lambda p: loss(splash_model, p)))(params)
  np.testing.assert_allclose(got[0], want[0], **TOL)
  for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(g, w, **TOL)
