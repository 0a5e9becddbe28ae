"""Layer stacks: scanned == unscanned, remat == no remat, dropout/drop-path switches."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.nn import attention, transformer

LAYER = dict(num_heads=2, head_dim=8, mlp_dim=32)


def _decoder_inputs():
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  enc = jax.random.normal(jax.random.key(1), (2, 7, 16))
  cross = attention.padding_mask(None, jnp.array([[1] * 7, [1] * 4 + [0] * 3], bool))
  return x, transformer.LayerContext(mask=attention.causal_mask(5), encoded=enc,
                                     cross_mask=cross)


@pytest.mark.parametrize("layer_cls", [transformer.Layer, transformer.CrossAttentionLayer])
def test_scan_and_unscanned_give_equal_outputs(layer_cls):
  x, context = _decoder_inputs()
  if layer_cls is transformer.Layer:
    context = transformer.LayerContext(mask=attention.causal_mask(5))
  unscanned = transformer.layer_stack(layer_cls, num_layers=3, scan_layers=False, **LAYER)
  scanned = transformer.layer_stack(layer_cls, num_layers=3, scan_layers=True, **LAYER)
  params = nn.unbox(jax.jit(unscanned.init)(jax.random.key(2), x, context)["params"])
  stacked = transformer.stack_unscanned_params(params, 3)
  abstract = jax.eval_shape(scanned.init, jax.random.key(2), x, context)["params"]
  assert jax.tree.map(jnp.shape, nn.unbox(abstract)) == jax.tree.map(jnp.shape, stacked)
  np.testing.assert_allclose(jax.jit(scanned.apply)({"params": stacked}, x, context),
                             jax.jit(unscanned.apply)({"params": params}, x, context),
                             rtol=1e-5, atol=1e-5)


def test_scanned_params_carry_layers_axis_name():
  x, context = _decoder_inputs()
  stack = transformer.layer_stack(transformer.CrossAttentionLayer, num_layers=2, **LAYER)
  specs = nn.get_partition_spec(jax.eval_shape(stack.init, jax.random.key(0), x, context))
  specs = specs["params"]
  assert tuple(specs["layers"]["mlp"]["wi"]["kernel"]) == ("layers", "embed", "mlp")
  assert tuple(specs["layers"]["cross_attention"]["query"]["kernel"]) == (
      "layers", "embed", "heads", "kv")


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_equal_outputs_and_gradients(scan, policy):
  x, context = _decoder_inputs()
  plain = transformer.layer_stack(transformer.CrossAttentionLayer, num_layers=2, scan_layers=scan,
                                  **LAYER)
  remat = transformer.layer_stack(transformer.CrossAttentionLayer, num_layers=2, scan_layers=scan,
                                  remat_policy=policy, **LAYER)
  params = jax.jit(plain.init)(jax.random.key(3), x, context)["params"]
  loss = lambda m: lambda p: jnp.sum(jnp.sin(m.apply({"params": p}, x, context)))
  (l_plain, g_plain) = jax.jit(jax.value_and_grad(loss(plain)))(params)
  (l_remat, g_remat) = jax.jit(jax.value_and_grad(loss(remat)))(params)
  np.testing.assert_allclose(l_remat, l_plain, rtol=1e-6)
  # The recomputed forward is a different XLA program (fused differently), so gradients of
  # order 1 may differ by float32 reassociation (seen: up to 4.3e-6 in the first layer).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               nn.unbox(g_plain), nn.unbox(g_remat))


def test_unknown_remat_policy_fails():
  x, context = _decoder_inputs()
  stack = transformer.layer_stack(transformer.CrossAttentionLayer, num_layers=1, remat_policy="some",
                                  **LAYER)
  with pytest.raises(ValueError, match="remat_policy"):
    stack.init(jax.random.key(0), x, context)


def test_dropout_and_drop_path_only_when_not_deterministic():
  x = jax.random.normal(jax.random.key(0), (4, 5, 16))
  context = transformer.LayerContext()
  stack = transformer.layer_stack(transformer.Layer, num_layers=2, dropout_rate=0.3,
                                  drop_path_rate=0.3, **LAYER)
  base = transformer.layer_stack(transformer.Layer, num_layers=2, **LAYER)
  params = jax.jit(base.init)(jax.random.key(1), x, context)
  run = jax.jit(lambda p, rng, det: stack.apply(p, x, context, det, rngs={"dropout": rng}),
                static_argnums=2)
  np.testing.assert_allclose(run(params, jax.random.key(2), True),
                             jax.jit(base.apply)(params, x, context))
  a, b = run(params, jax.random.key(2), False), run(params, jax.random.key(3), False)
  assert not np.allclose(a, b)


def test_drop_path_drops_whole_examples():
  drop = transformer.DropPath(0.5)
  x = jnp.ones((64, 3, 4))
  y = drop.apply({}, x, False, rngs={"dropout": jax.random.key(0)})
  per_example = y.reshape(64, -1)
  assert set(np.unique(per_example)) <= {0.0, 2.0}
  assert np.all(per_example.min(1) == per_example.max(1))
