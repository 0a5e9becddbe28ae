"""The loss and the train step shared by every family.

loss = sum_bt(w_b * m_bt * ce_bt) / sum_bt(m_bt): per-example weights (mixture loss weights)
scale an example's tokens (packed rows: w_bt, each token its example's weight); the denominator counts target tokens, so gradient accumulation over
micro-batches gives exactly the full-batch gradient.
"""
import jax
import jax.numpy as jnp
import optax

from vlm_jax.params import merge_params
from vlm_jax.train.state import TrainState


def token_cross_entropy(logits, batch) -> tuple[jax.Array, jax.Array]:
  """(weighted sum of token cross-entropies, number of target tokens)."""
  ce = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), batch["targets"])
  mask = batch["loss_mask"].astype(jnp.float32)
  weight = batch["loss_weight"].astype(jnp.float32)
  if weight.ndim == 1:  # per example; packed rows carry one per token (data/packing.py)
    weight = weight[:, None]
  return jnp.sum(ce * mask * weight), jnp.sum(mask)


def make_train_step(model, tx: optax.GradientTransformation, config, schedule=None):
  accum = config.grad_accum_steps

  def loss_sum(trainable, frozen, batch, rng):
    logits = model.apply({"params": merge_params(trainable, frozen)}, batch,
                         deterministic=False, rngs={"dropout": rng})
    num, den = token_cross_entropy(logits, batch)
    return num, den

  grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

  def accumulate(trainable, frozen, batch, rng):
    if accum == 1:
      return grad_fn(trainable, frozen, batch, rng)
    # [B, ...] -> [B/accum, accum, ...]: each device keeps its own rows in every micro-batch.
    micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), batch)

    def body(carry, i):
      (num, den), grads = carry
      mb = jax.tree.map(lambda x: x[:, i], micro)
      (n, d), g = grad_fn(trainable, frozen, mb, jax.random.fold_in(rng, i))
      return ((num + n, den + d), jax.tree.map(jnp.add, grads, g)), None

    zeros = ((jnp.zeros(()), jnp.zeros(())), jax.tree.map(jnp.zeros_like, trainable))
    (sums, grads), _ = jax.lax.scan(body, zeros, jnp.arange(accum))
    return sums, grads

  def train_step(state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    (num, den), grads = accumulate(state.params, state.frozen, batch, rng)
    den = jnp.maximum(den, 1.0)
    loss = num / den
    grads = jax.tree.map(lambda g: g / den, grads)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    def update(params, opt_state):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    new_params, new_opt_state = jax.lax.cond(finite, update, lambda *old: old, state.params,
                                             state.opt_state)
    new_state = state.replace(
        step=state.step + 1,
        params=new_params,
        opt_state=new_opt_state,
        nonfinite_step=jnp.where(~finite & (state.nonfinite_step < 0), state.step,
                                 state.nonfinite_step))
    metrics = {"loss": loss, "grad_norm": grad_norm, "target_tokens": den,
               "nonfinite": (~finite).astype(jnp.float32)}
    if schedule is not None:
      metrics["learning_rate"] = schedule(state.step)
    return new_state, metrics

  return train_step
