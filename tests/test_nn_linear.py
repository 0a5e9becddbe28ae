"""nn/linear.py: the dense contraction equals lax.dot_general, values and both gradients, and
skips the kernel gradient of a kernel that is not differentiated."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.nn import linear


def _reference(x, kernel, num_in):
  contract = (tuple(range(x.ndim - num_in, x.ndim)), tuple(range(num_in)))
  return jax.lax.dot_general(x, kernel, (contract, ((), ())))


@pytest.mark.parametrize("x_shape,kernel_shape,num_in", [
    ((2, 5, 6), (6, 7), 1),  # Dense
    ((2, 5, 6), (6, 3, 4), 1),  # query/key/value [D, N, H]
    ((2, 5, 3, 4), (3, 4, 6), 2),  # attention output [N, H, D]
    ((7, 6), (6, 2), 1),  # no batch axis
])
def test_contract_matches_dot_general_and_its_gradients(x_shape, kernel_shape, num_in):
  kx, kk, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, x_shape)
  kernel = jax.random.normal(kk, kernel_shape)
  out_shape = x_shape[:len(x_shape) - num_in] + kernel_shape[num_in:]
  g = jax.random.normal(kg, out_shape)
  ours = lambda x, k: jnp.sum(jnp.tanh(linear.contract(x, k, num_in)) * g)
  ref = lambda x, k: jnp.sum(jnp.tanh(_reference(x, k, num_in)) * g)
  np.testing.assert_allclose(linear.contract(x, kernel, num_in), _reference(x, kernel, num_in),
                             rtol=1e-5, atol=1e-5)
  for argnums in ((0,), (1,), (0, 1)):
    got = jax.jit(jax.grad(ours, argnums))(x, kernel)
    want = jax.grad(ref, argnums)(x, kernel)
    for a, b in zip(got, want):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _num_dots(fn, *args) -> int:
  return jax.jit(fn).lower(*args).as_text().count("stablehlo.dot_general")


def test_frozen_kernel_gets_no_kernel_gradient_dot():
  x, kernel = jnp.ones((4, 8)), jnp.ones((8, 16))
  # The forward dot and dx only: no x^T dy for a kernel that is a constant here.
  assert _num_dots(jax.grad(lambda x: jnp.sum(linear.contract(x, kernel, 1) ** 2)), x) == 2
  # ...and when only the kernel is differentiated, dx is the dot skipped.
  assert _num_dots(jax.grad(lambda k: jnp.sum(linear.contract(x, k, 1) ** 2)), kernel) == 2
  both = jax.grad(lambda x, k: jnp.sum(linear.contract(x, k, 1) ** 2), (0, 1))
  assert _num_dots(both, x, kernel) == 3


def test_dense_with_our_dot_general_keeps_params_and_values():
  x = jax.random.normal(jax.random.key(1), (3, 4, 5))
  plain = nn.Dense(6)
  ours = nn.Dense(6, dot_general=linear.dot_general)
  params = plain.init(jax.random.key(2), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(2), x)) == \
      jax.tree.map(jnp.shape, params)
  np.testing.assert_allclose(ours.apply(params, x), plain.apply(params, x), rtol=1e-5,
                             atol=1e-5)
  grad = lambda m: jax.grad(lambda p: jnp.sum(jnp.sin(m.apply(p, x))))(params)
  for a, b in zip(jax.tree.leaves(grad(ours)), jax.tree.leaves(grad(plain))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_other_contractions_pass_through_to_lax():
  a, b = jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))
  dims = (((2,), (1,)), ((0,), (0,)))  # batched: not a dense layer's contraction
  np.testing.assert_array_equal(linear.dot_general(a, b, dims), jax.lax.dot_general(a, b, dims))
