"""train/step.py: a finite step applies exactly the optimizer's update; a step whose loss is
not finite leaves parameters and optimizer state bit-for-bit as they were."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vlm_jax.train import step as step_lib
from vlm_jax.train.state import TrainState

VOCAB, WIDTH = 11, 8


class TinyLM(nn.Module):
  @nn.compact
  def __call__(self, batch, deterministic=True):
    x = nn.Embed(VOCAB, WIDTH)(batch["tokens"])
    return nn.Dense(VOCAB)(jnp.tanh(nn.Dense(WIDTH)(x)))


def _setup(loss_weight):
  model = TinyLM()
  tokens = jax.random.randint(jax.random.key(0), (2, 5), 0, VOCAB)
  batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, axis=1),
           "loss_mask": jnp.ones((2, 5)), "loss_weight": jnp.array([1.0, loss_weight])}
  params = model.init(jax.random.key(1), batch)["params"]
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
  opt_state = tx.init(params)
  opt_state = tx.update(jax.tree.map(jnp.ones_like, params), opt_state, params)[1]  # moments != 0
  state = TrainState(step=jnp.array(3), params=params, frozen={}, opt_state=opt_state,
                     nonfinite_step=jnp.array(-1))
  config = ml_collections.ConfigDict({"grad_accum_steps": 1})
  return model, tx, config, state, batch


def test_finite_step_applies_the_optimizer_update():
  model, tx, config, state, batch = _setup(1.0)
  new_state, metrics = jax.jit(step_lib.make_train_step(model, tx, config))(
      state, batch, jax.random.key(2))
  def loss(params):
    num, den = step_lib.token_cross_entropy(model.apply({"params": params}, batch), batch)
    return num / den
  grads = jax.grad(loss)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  expected = optax.apply_updates(state.params, updates)
  for got, want in zip(jax.tree.leaves((new_state.params, new_state.opt_state)),
                       jax.tree.leaves((expected, opt_state))):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert int(new_state.step) == 4 and int(new_state.nonfinite_step) == -1
  assert float(metrics["nonfinite"]) == 0.0


def test_nonfinite_step_leaves_params_and_optimizer_state_unchanged():
  model, tx, config, state, batch = _setup(float("nan"))
  before = jax.tree.map(np.asarray, (state.params, state.opt_state))
  new_state, metrics = jax.jit(step_lib.make_train_step(model, tx, config))(
      state, batch, jax.random.key(2))
  for got, want in zip(jax.tree.leaves((new_state.params, new_state.opt_state)),
                       jax.tree.leaves(before)):
    np.testing.assert_array_equal(got, want)
  assert int(new_state.step) == 4 and int(new_state.nonfinite_step) == 3
  assert float(metrics["nonfinite"]) == 1.0
