"""Attention: masks (incl. fully masked rows), grouped-query, rotary, KV cache decoding."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.nn import attention


def reference_attention(params, xq, xkv, mask, num_heads, num_kv_heads, head_dim):
  """Plain-numpy-style attention (softmax over valid keys; rows with none give zero)."""
  p = nn.unbox(params)
  q = jnp.einsum("BTD,DNH->BTNH", xq, p["query"]["kernel"]) + p["query"]["bias"]
  k = jnp.einsum("BSD,DKH->BSKH", xkv, p["key"]["kernel"]) + p["key"]["bias"]
  v = jnp.einsum("BSD,DKH->BSKH", xkv, p["value"]["kernel"]) + p["value"]["bias"]
  k = jnp.repeat(k, num_heads // num_kv_heads, axis=2)
  v = jnp.repeat(v, num_heads // num_kv_heads, axis=2)
  logits = jnp.einsum("BTNH,BSNH->BNTS", q, k) * head_dim ** -0.5
  mask = jnp.broadcast_to(mask, logits.shape)
  logits = jnp.where(mask, logits, -jnp.inf)
  weights = jnp.exp(logits - jnp.max(jnp.where(mask, logits, -1e30), -1, keepdims=True))
  weights = weights / jnp.maximum(weights.sum(-1, keepdims=True), 1e-30)
  out = jnp.einsum("BNTS,BSNH->BTNH", weights, v)
  return jnp.einsum("BTNH,NHD->BTD", out, p["out"]["kernel"]) + p["out"]["bias"]


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_matches_reference_with_arbitrary_mask_and_gqa(num_kv_heads):
  rng = np.random.default_rng(0)
  xq = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
  xkv = jnp.asarray(rng.normal(size=(2, 7, 16)), jnp.float32)
  mask = jnp.asarray(rng.random((2, 4, 5, 7)) > 0.4)
  mask = mask.at[:, :, 2].set(False)  # some fully masked rows
  layer = attention.MultiHeadAttention(num_heads=4, head_dim=8, num_kv_heads=num_kv_heads)
  params = jax.jit(layer.init)(jax.random.key(0), xq, xkv, mask)["params"]
  out = jax.jit(layer.apply)({"params": params}, xq, xkv, mask)
  want = reference_attention(params, xq, xkv, mask, 4, num_kv_heads, 8)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_fully_masked_row_outputs_exact_zero_and_finite_gradients():
  x = jax.random.normal(jax.random.key(1), (2, 4, 16))
  kv = jax.random.normal(jax.random.key(2), (2, 6, 16))
  key_valid = jnp.array([[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], bool)  # 2nd: nothing valid
  mask = attention.padding_mask(None, key_valid)
  layer = attention.MultiHeadAttention(num_heads=2, head_dim=8, use_bias=False)
  params = jax.jit(layer.init)(jax.random.key(0), x, kv, mask)["params"]
  out = jax.jit(layer.apply)({"params": params}, x, kv, mask)
  assert bool(jnp.all(jnp.isfinite(out)))
  np.testing.assert_array_equal(out[1], 0.0)  # no uniform average over padding
  assert float(jnp.abs(out[0]).sum()) > 0
  grads = jax.jit(jax.grad(lambda p, kv: layer.apply({"params": p}, x, kv, mask).sum(),
                           argnums=(0, 1)))(params, kv)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  np.testing.assert_array_equal(grads[1][1], 0.0)  # masked keys get no gradient


def test_masked_keys_do_not_change_output():
  x = jax.random.normal(jax.random.key(1), (1, 3, 16))
  kv = jax.random.normal(jax.random.key(2), (1, 5, 16))
  mask = attention.padding_mask(None, jnp.array([[1, 1, 0, 1, 0]], bool))
  layer = attention.MultiHeadAttention(num_heads=2, head_dim=8)
  params = jax.jit(layer.init)(jax.random.key(0), x, kv, mask)
  kv2 = kv.at[:, [2, 4]].set(100.0)
  apply = jax.jit(layer.apply)
  np.testing.assert_allclose(apply(params, x, kv, mask), apply(params, x, kv2, mask),
                             atol=1e-6)


def test_rotary_scores_depend_on_relative_position_only():
  from vlm_jax.nn import embeddings
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, 8))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, 8))
  score = lambda m, n: float(jnp.sum(embeddings.apply_rotary(q, jnp.array([[m]]))
                                     * embeddings.apply_rotary(k, jnp.array([[n]]))))
  assert score(5, 2) == pytest.approx(score(13, 10), rel=1e-4)
  assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)


@pytest.mark.parametrize("use_rotary,num_kv_heads", [(False, None), (True, 1)])
def test_kv_cache_step_by_step_equals_full_causal_forward(use_rotary, num_kv_heads):
  length = 6
  x = jax.random.normal(jax.random.key(3), (2, length, 16))
  layer = attention.MultiHeadAttention(num_heads=2, head_dim=8, num_kv_heads=num_kv_heads,
                                       use_rotary=use_rotary)
  params = jax.jit(layer.init)(jax.random.key(0), x, mask=attention.causal_mask(length))
  params = params["params"]
  full = jax.jit(layer.apply)({"params": params}, x, mask=attention.causal_mask(length))
  step = jax.jit(lambda variables, x: layer.apply(variables, x, decode=True, mutable=["cache"]))
  # The creating call sizes the cache; then feed one token, then two at once.
  _, variables = step({"params": params}, x)
  cache = variables["cache"]
  steps = []
  for start, stop in [(0, 1), (1, 2), (2, 4), (4, 5), (5, 6)]:
    out, variables = step({"params": params, "cache": cache}, x[:, start:stop])
    cache = variables["cache"]
    steps.append(out)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, rtol=1e-5, atol=1e-5)
  assert int(cache["cache_index"]) == length


def test_cross_attention_caches_keys_and_values_for_decoding():
  layer = attention.MultiHeadAttention(num_heads=2, head_dim=8)
  kq, kkv, kp = jax.random.split(jax.random.key(0), 3)
  queries, memory = jax.random.normal(kq, (2, 3, 16)), jax.random.normal(kkv, (2, 5, 16))
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)[:, None, None, :]
  params = layer.init(kp, queries, memory)["params"]
  want = layer.apply({"params": params}, queries, memory, mask=mask)
  _, filled = layer.apply({"params": params}, queries[:, :1], memory, mask=mask, decode=True,
                          mutable=["cache"])
  assert filled["cache"]["cross_key"].shape == (2, 5, 2, 8)
  # Later queries read the cached keys/values: the memory is not needed (nor re-projected).
  got = layer.apply({"params": params, **filled}, queries, mask=mask, decode=True,
                    kv_from_cache=True)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="kv_from_cache"):
    layer.apply({"params": params}, queries, mask=mask, decode=True, kv_from_cache=True)
