"""LoRA: zero-init B equals the base model; merged weights equal the unmerged LoRA model."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from vlm_jax.nn import attention, decoder_lm, lora

LM = dict(vocab_size=48, width=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48)
LORA = dict(lora_targets=("query", "value"), lora_rank=4, lora_alpha=16.0)


def _tokens():
  return jax.random.randint(jax.random.key(3), (2, 9), 4, 48)


def _init(model):
  return nn.unbox(jax.jit(model.init)(jax.random.key(0), _tokens()))["params"]


def _apply(model, params, **kwargs):
  return jax.jit(lambda p, t: model.apply({"params": p}, t, **kwargs))(params, _tokens())


def _randomise_lora_b(params):
  flat = traverse_util.flatten_dict(params, sep="/")
  keys = iter(jax.random.split(jax.random.key(7), len(flat)))
  flat = {k: (0.1 * jax.random.normal(next(keys), v.shape) if k.endswith("lora_b") else v)
          for k, v in flat.items()}
  return traverse_util.unflatten_dict(flat, sep="/")


def _without_lora(params):
  flat = traverse_util.flatten_dict(params, sep="/")
  return traverse_util.unflatten_dict(
      {k: v for k, v in flat.items() if "/lora_" not in k}, sep="/")


@pytest.fixture(scope="module")
def models():
  plain, with_lora = decoder_lm.DecoderLM(**LM), decoder_lm.DecoderLM(**LM, **LORA)
  return plain, with_lora, _init(with_lora)


def test_lora_params_beside_base_weights(models):
  plain, _, params = models
  attn = params["layers"]["layers"]["self_attention"]
  assert set(attn["query"]) == {"kernel", "lora_a", "lora_b"}
  assert set(attn["key"]) == {"kernel"}
  assert attn["query"]["lora_a"].shape == (2, 32, 4)  # [layers, D, r]
  assert attn["value"]["lora_b"].shape == (2, 4, 2, 8)  # [layers, r, K, H]
  assert not np.any(attn["query"]["lora_b"])
  base_shapes = jax.tree.map(jnp.shape, _without_lora(params))
  assert base_shapes == jax.tree.map(jnp.shape, _init(plain))


def test_zero_b_equals_base_model(models):
  plain, with_lora, params = models
  np.testing.assert_allclose(_apply(with_lora, params),
                             _apply(plain, _without_lora(params)), atol=1e-6)


def test_merged_weights_equal_unmerged(models):
  plain, with_lora, params = models
  params = _randomise_lora_b(params)
  unmerged = _apply(with_lora, params)
  assert not np.allclose(unmerged, _apply(plain, _without_lora(params)), atol=1e-3)
  merged = lora.merge_lora(params, alpha=LORA["lora_alpha"])
  assert jax.tree.map(jnp.shape, merged) == jax.tree.map(jnp.shape, _without_lora(params))
  np.testing.assert_allclose(_apply(plain, merged), unmerged, atol=1e-5)


def test_merge_unscanned_single_projection():
  dense = lora.LoraDense((3, 5), rank=2, alpha=4.0)
  x = jax.random.normal(jax.random.key(0), (4, 6))
  params = nn.unbox(dense.init(jax.random.key(1), x))["params"]
  params = dict(params, lora_b=jax.random.normal(jax.random.key(2), (2, 3, 5)))
  merged = lora.merge_lora(params, alpha=4.0)
  assert set(merged) == {"kernel"}
  np.testing.assert_allclose(jnp.einsum("bd,dnh->bnh", x, merged["kernel"]),
                             dense.apply({"params": params}, x), atol=1e-5)


def test_lora_dropout_only_in_training(models):
  _, _, params = models
  noisy = decoder_lm.DecoderLM(**LM, **dict(LORA, lora_dropout_rate=0.5))
  params = _randomise_lora_b(params)
  run = lambda det: jax.jit(lambda p: noisy.apply({"params": p}, _tokens(), deterministic=det,
                                                  rngs={"dropout": jax.random.key(5)}))(params)
  np.testing.assert_allclose(run(True), _apply(noisy, params), atol=1e-6)
  assert not np.allclose(run(False), run(True), atol=1e-4)


def test_bad_targets_and_malformed_trees_raise():
  attn = lora.LoraMultiHeadAttention(num_heads=2, head_dim=4, lora_targets=("out",))
  with pytest.raises(ValueError, match="lora_targets"):
    attn.init(jax.random.key(0), jnp.ones((1, 3, 8)))
  with pytest.raises(ValueError, match="lora_a"):
    lora.merge_lora({"q": {"kernel": jnp.ones((2, 2)), "lora_a": jnp.ones((2, 1))}}, 1.0)


def test_plain_attention_is_unchanged_without_targets():
  x = jax.random.normal(jax.random.key(0), (1, 3, 8))
  base = attention.MultiHeadAttention(num_heads=2, head_dim=4)
  wrapped = lora.LoraMultiHeadAttention(num_heads=2, head_dim=4)
  params = base.init(jax.random.key(1), x)
  np.testing.assert_allclose(wrapped.apply(params, x), base.apply(params, x), atol=1e-6)
