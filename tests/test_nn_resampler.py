"""Perceiver Resampler: fixed output length, padding never attended, time embeddings per frame.

Numerical parity with open-flamingo's PerceiverResampler is in tests/test_flamingo.py.
"""
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.nn.resampler import PerceiverResampler


def _init(module, x, mask=None):
  return module.init(jax.random.key(0), x, mask)


def test_output_length_is_the_number_of_latents_whatever_the_input_length():
  module = PerceiverResampler(num_latents=6, num_layers=2, num_heads=2, head_dim=8)
  x = jax.random.normal(jax.random.key(1), (2, 1, 9, 16))
  params = _init(module, x)
  for tokens in (1, 9, 40):
    out = module.apply(params, jax.random.normal(jax.random.key(2), (2, 1, tokens, 16)))
    assert out.shape == (2, 6, 16)


def test_padded_tokens_are_never_attended_and_all_padding_is_finite():
  module = PerceiverResampler(num_latents=4, num_layers=2, num_heads=2, head_dim=8,
                              mlp_activation="squared_relu", use_bias=True)
  x = jax.random.normal(jax.random.key(1), (2, 1, 10, 16))
  mask = jnp.asarray([[1] * 6 + [0] * 4, [0] * 10], jnp.float32).reshape(2, 1, 10)
  params = _init(module, x, mask)
  out = module.apply(params, x, mask)
  garbage = x.at[:, :, 6:].set(1e3)
  np.testing.assert_allclose(module.apply(params, garbage, mask)[0], out[0], atol=1e-6)
  assert np.all(np.isfinite(np.asarray(out[1])))
  # The real tokens of row 0 do change the latents (a random change: LayerNorm would cancel
  # a constant shift).
  moved = x.at[:, :, 0].add(jax.random.normal(jax.random.key(3), (2, 1, 16)))
  assert not np.allclose(module.apply(params, moved, mask)[0], out[0])


def test_time_embeddings_tell_frames_apart():
  module = PerceiverResampler(num_latents=4, num_layers=1, num_heads=2, head_dim=8,
                              num_frames=3)
  frame = jax.random.normal(jax.random.key(1), (1, 1, 5, 16))
  video = jnp.concatenate([frame, 2 * frame], axis=1)
  params = _init(module, video)
  swapped = jnp.concatenate([2 * frame, frame], axis=1)
  assert not np.allclose(module.apply(params, video), module.apply(params, swapped), atol=1e-4)
  without = PerceiverResampler(num_latents=4, num_layers=1, num_heads=2, head_dim=8)
  p2 = _init(without, video)
  np.testing.assert_allclose(without.apply(p2, video), without.apply(p2, swapped), atol=1e-5)
