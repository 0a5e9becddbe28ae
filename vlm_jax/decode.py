"""Greedy decoding with a KV cache for encoder-decoder families (encode / decode methods).

The model must expose `encode(batch) -> (encoded, encoder_mask)` and
`decode(encoded, encoder_mask, tokens, positions=..., decode=True)` (SimVLM does). One jitted
program per (model, max_len, batch shapes): the encoder runs once, then `max_len` cached
single-token decoder steps inside a `lax.scan`.
"""
import functools

import jax
import jax.numpy as jnp

PAD_ID, EOS_ID, BOS_ID = 0, 1, 3  # docs/architecture.md


def greedy_decode(model, params, batch, max_len: int, *, bos_id: int = BOS_ID,
                  eos_id: int = EOS_ID, pad_id: int = PAD_ID) -> jax.Array:
  """Token ids [B, max_len]: the argmax continuation after BOS, EOS included, then pad.

  `params` is the (unboxed) param tree; `batch` needs images, image_mask, prefix_tokens and
  prefix_mask (other keys are ignored).
  """
  max_text = getattr(model, "max_text_length", None)
  if max_text is not None and max_len > max_text:
    raise ValueError(f"max_len={max_len} exceeds the model's max_text_length={max_text}.")
  keys = ("images", "image_mask", "prefix_tokens", "prefix_mask")
  return _greedy(params, {k: batch[k] for k in keys}, model=model, max_len=max_len,
                 bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)


@functools.partial(jax.jit, static_argnames=("model", "max_len", "bos_id", "eos_id", "pad_id"))
def _greedy(params, batch, *, model, max_len, bos_id, eos_id, pad_id):
  encoded, encoder_mask = model.apply({"params": params}, batch, method="encode")
  batch_size = encoded.shape[0]

  def run_decoder(cache, tokens, positions):
    variables = {"params": params} if cache is None else {"params": params, "cache": cache}
    logits, mutated = model.apply(variables, encoded, encoder_mask, tokens,
                                  positions=positions, decode=True, method="decode",
                                  mutable=["cache"])
    return logits, mutated["cache"]

  # The cache-creating call sizes the buffers; only its shapes are needed.
  full = jnp.zeros((batch_size, max_len), jnp.int32)
  cache_shapes = jax.eval_shape(lambda: run_decoder(None, full, None)[1])
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes)

  def step(carry, t):
    cache, token, done = carry
    positions = jnp.full((batch_size, 1), t, jnp.int32)
    logits, cache = run_decoder(cache, token[:, None], positions)
    next_token = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
    next_token = jnp.where(done, pad_id, next_token)
    return (cache, next_token, done | (next_token == eos_id)), next_token

  init = (cache, jnp.full((batch_size,), bos_id, jnp.int32), jnp.zeros((batch_size,), bool))
  _, out = jax.lax.scan(step, init, jnp.arange(max_len))
  return out.T
