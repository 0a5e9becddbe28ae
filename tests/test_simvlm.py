"""SimVLM semantics: PrefixLM attention pattern, causality, padding invariance, decoding,
scan/remat equivalence, registry, and paper-size parameter counts."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import config as config_lib
from vlm_jax import decode as decode_lib
from vlm_jax.models import registry, simvlm
from vlm_jax.nn import transformer

B, LP, LS, IMAGE = 3, 5, 6, 32  # 32 px -> 2x2 = 4 image tokens
N_IMG = 4


def small_config(**model_overrides):
  c = config_lib.load_config("configs/simvlm.py:tiny")
  c.model.lm.update(dict(vocab_size=50, width=32, num_heads=2, mlp_dim=64, encoder_layers=2,
                         decoder_layers=2, max_text_length=8, tie_embeddings=False))
  c.model.vision.update(dict(width=8, stage_blocks=(1, 1, 1)))
  c.model.update(model_overrides)
  c.data.image_size, c.data.prefix_length, c.data.suffix_length = IMAGE, LP, LS
  return c


def make_batch(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "images": jnp.asarray(rng.uniform(-1, 1, (B, 1, IMAGE, IMAGE, 3)), jnp.float32),
      "image_mask": jnp.array([[1.0], [0.0], [1.0]]),  # example 1 is text-only
      "prefix_tokens": jnp.asarray(rng.integers(4, 50, (B, LP)), jnp.int32),
      "prefix_mask": jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], jnp.float32),
      "tokens": jnp.asarray(rng.integers(4, 50, (B, LS)), jnp.int32),
      "targets": jnp.asarray(rng.integers(4, 50, (B, LS)), jnp.int32),
      "loss_mask": jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]],
                             jnp.float32),
      "loss_weight": jnp.ones((B,)),
  }


@functools.lru_cache(maxsize=None)
def model_and_variables(**overrides):
  model = registry.build(small_config(**dict(overrides)).model)
  variables = jax.jit(model.init)(jax.random.key(0), make_batch())
  return model, nn.unbox(variables)


@functools.lru_cache(maxsize=None)
def jitted(model, method=None):
  return jax.jit(functools.partial(model.apply, method=method))


def forward(model, params, batch):
  return jitted(model)({"params": params}, batch)


def encode(model, params, batch):
  return jitted(model, "encode")({"params": params}, batch)


def test_registry_builds_simvlm_from_config_and_rejects_unknown_fields():
  c = small_config()
  model = registry.build(c.model)
  assert isinstance(model, simvlm.SimVLM) and model.lm.width == 32
  c.model.lm.widht = 3
  with pytest.raises(config_lib.ConfigError, match=r"config.model.lm .*\['widht'\].*width"):
    registry.build(c.model)
  c = small_config()
  c.model.widht = 3
  with pytest.raises(config_lib.ConfigError, match=r"config.model .*\['widht'\]"):
    registry.build(c.model)
  c = small_config()
  c.model.name = "nope"
  with pytest.raises(config_lib.ConfigError, match="neither vlm_jax.models.nope nor nope.model"):
    registry.build(c.model)


def test_logits_shape_and_finite_even_with_empty_encoder():
  model, variables = model_and_variables()
  batch = make_batch()
  # example 2 has no prefix; make it text-only too: every encoder key is masked
  batch["image_mask"] = batch["image_mask"].at[2].set(0.0)
  logits = forward(model, variables["params"], batch)
  assert logits.shape == (B, LS, 50)
  assert bool(jnp.all(jnp.isfinite(logits)))


def test_suffix_does_not_change_encoder_output():
  model, variables = model_and_variables()
  batch = make_batch()
  other = dict(batch, tokens=(batch["tokens"] + 7) % 50, loss_mask=jnp.ones((B, LS)))
  for a, b in zip(encode(model, variables["params"], batch),
                  encode(model, variables["params"], other)):
    np.testing.assert_array_equal(a, b)


def test_decoder_is_causal():
  model, variables = model_and_variables()
  batch = make_batch()
  base = forward(model, variables["params"], batch)
  for t in range(1, LS):
    changed = dict(batch, tokens=batch["tokens"].at[:, t].set(batch["tokens"][:, t] % 40 + 5))
    logits = forward(model, variables["params"], changed)
    np.testing.assert_allclose(logits[:, :t], base[:, :t], rtol=1e-5, atol=1e-5)
    assert not np.allclose(logits[:, t], base[:, t])


def test_padding_never_changes_valid_outputs():
  model, variables = model_and_variables()
  batch = make_batch()
  base = forward(model, variables["params"], batch)
  prefix_pad = batch["prefix_mask"] == 0
  suffix_pad = batch["loss_mask"] == 0
  no_image = (batch["image_mask"] == 0)[:, :, None, None, None]
  changed = dict(
      batch,
      prefix_tokens=jnp.where(prefix_pad, 17, batch["prefix_tokens"]),
      tokens=jnp.where(suffix_pad, 23, batch["tokens"]),
      images=jnp.where(no_image, 0.9, batch["images"]))
  logits = forward(model, variables["params"], changed)
  valid = np.asarray(batch["loss_mask"]) > 0
  np.testing.assert_allclose(np.asarray(logits)[valid], np.asarray(base)[valid],
                             rtol=1e-5, atol=1e-5)
  # ... and the change is not a no-op where it is not padding:
  visible = dict(batch, images=batch["images"] * 0.5)
  assert not np.allclose(forward(model, variables["params"], visible)[0], base[0])


def paligemma_prefix_lm_mask(prefix_valid, suffix_valid):
  """big_vision PaliGemma rule: i may attend to j iff cumsum(flag)[j] <= cumsum(flag)[i] and
  both are valid; flag 0 = prefix, 1 = causal (suffix)."""
  flag = np.concatenate([np.zeros_like(prefix_valid), np.ones_like(suffix_valid)], 1)
  valid = np.concatenate([prefix_valid, suffix_valid], 1) > 0
  cums = np.cumsum(flag, axis=1)
  return (cums[:, None, :] <= cums[:, :, None]) & valid[:, :, None] & valid[:, None, :]


def test_dependency_pattern_matches_paligemma_prefix_lm_rule():
  """Jacobian of outputs at [prefix ; suffix] positions w.r.t. the input text embeddings."""
  model, variables = model_and_variables()
  params, perturbations = variables["params"], variables["perturbations"]
  batch = make_batch()
  r_enc = jax.random.normal(jax.random.key(1), (32,))
  r_dec = jax.random.normal(jax.random.key(2), (50,))

  def outputs(perturb):
    v = {"params": params, "perturbations": perturb}
    encoded, _ = model.apply(v, batch, method="encode")
    logits = model.apply(v, batch)
    return jnp.concatenate([encoded[:, N_IMG:] @ r_enc, logits @ r_dec], axis=1)  # [B, L]

  jac = jax.jit(jax.jacrev(outputs))(perturbations)
  depends = jnp.concatenate([jnp.any(jac["prefix_embeddings"] != 0, -1),
                             jnp.any(jac["suffix_embeddings"] != 0, -1)], axis=-1)
  depends = np.asarray(depends[np.arange(B), :, np.arange(B)])  # same example: [B, L, L]
  expected = paligemma_prefix_lm_mask(np.asarray(batch["prefix_mask"]),
                                      np.asarray(batch["loss_mask"]))
  row_valid = np.concatenate([batch["prefix_mask"], batch["loss_mask"]], 1) > 0
  np.testing.assert_array_equal(depends[row_valid], expected[row_valid])
  # and no example depends on another one
  cross = jnp.any(jac["prefix_embeddings"] != 0, -1).sum() + jnp.any(
      jac["suffix_embeddings"] != 0, -1).sum() - depends.sum()
  assert int(cross) == 0


def test_scan_and_unscanned_models_agree():
  scanned, variables = model_and_variables(scan_layers=True)
  unscanned, unscanned_vars = model_and_variables(scan_layers=False)
  params = dict(unscanned_vars["params"])
  params["encoder"] = transformer.stack_unscanned_params(params["encoder"], 2)
  params["decoder"] = transformer.stack_unscanned_params(params["decoder"], 2)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, variables["params"])
  batch = make_batch()
  np.testing.assert_allclose(forward(scanned, params, batch),
                             forward(unscanned, unscanned_vars["params"], batch),
                             rtol=1e-5, atol=1e-5)


def test_remat_policy_is_wired_into_the_gradient():
  """Numerics of remat vs none are checked per stack in test_nn_transformer.py; here: the
  config field reaches the model (the backward pass contains rematerialised layers)."""
  plain, variables = model_and_variables()
  remat = registry.build(small_config(remat_policy="full").model)
  batch = make_batch()
  loss = lambda model: lambda p: jnp.sum(model.apply({"params": p}, batch) ** 2)
  grad_jaxpr = lambda model: str(jax.make_jaxpr(jax.grad(loss(model)))(variables["params"]))
  assert "remat" not in grad_jaxpr(plain) and "checkpoint" not in grad_jaxpr(plain)
  assert "remat" in grad_jaxpr(remat) or "checkpoint" in grad_jaxpr(remat)


def test_cached_decoding_equals_full_decoder_forward():
  model, variables = model_and_variables()
  params, batch = variables["params"], make_batch()
  encoded, encoder_mask = encode(model, params, batch)
  full = jitted(model, "decode")({"params": params}, encoded, encoder_mask, batch["tokens"])

  @jax.jit
  def step(cache, tokens, positions):
    v = {"params": params} if cache is None else {"params": params, "cache": cache}
    return model.apply(v, encoded, encoder_mask, tokens, positions=positions, decode=True,
                       method="decode", mutable=["cache"])

  _, cache = step(None, batch["tokens"], None)
  for t in range(LS):
    logits, cache = step(cache["cache"], batch["tokens"][:, t:t + 1], jnp.full((B, 1), t))
    np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-5, atol=1e-5)


def test_greedy_decode_matches_teacher_forced_argmax():
  model, variables = model_and_variables()
  params, batch = variables["params"], make_batch()
  out = decode_lib.generate(model, params, batch, max_len=LS, eos_id=-1).tokens
  assert out.shape == (B, LS) and out.dtype == jnp.int32
  inputs = jnp.concatenate([jnp.full((B, 1), decode_lib.BOS_ID), out[:, :-1]], axis=1)
  logits = forward(model, params, dict(batch, tokens=inputs, loss_mask=jnp.ones((B, LS))))
  np.testing.assert_array_equal(jnp.argmax(logits, -1), out)
  with pytest.raises(ValueError, match="max_text_length"):
    decode_lib.generate(model, params, batch, max_len=9)


def test_greedy_decode_pads_after_eos():
  model, variables = model_and_variables()
  params, batch = variables["params"], make_batch()
  first = decode_lib.generate(model, params, batch, max_len=LS, eos_id=-1).tokens
  eos = int(first[0, 1])  # pretend the second generated token is EOS
  out = np.asarray(decode_lib.generate(model, params, batch, max_len=LS, eos_id=eos).tokens)
  for row in out:
    hits = np.flatnonzero(row == eos)
    if hits.size:
      assert np.all(row[hits[0] + 1:] == decode_lib.PAD_ID)
  assert out[0, 1] == eos and np.all(out[0, 2:] == decode_lib.PAD_ID)


# Parameter counts by jax.eval_shape (docs/models.md lists the same numbers).
PAPER_SIZE_PARAMS = {"base": 232_634_176, "large": 748_126_272, "huge": 1_520_552_256}


@pytest.mark.parametrize("size", sorted(PAPER_SIZE_PARAMS))
def test_paper_size_param_counts(size):
  c = config_lib.load_config(f"configs/simvlm.py:{size}")
  model = registry.build(c.model)
  abstract = jax.eval_shape(lambda b: model.init(jax.random.key(0), b)["params"],
                            registry.batch_spec(c, 1))
  assert sum(x.size for x in jax.tree.leaves(nn.unbox(abstract))) == PAPER_SIZE_PARAMS[size]
