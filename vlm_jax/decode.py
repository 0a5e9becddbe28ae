"""Generation with a KV cache for every family: greedy, sampling and beam search.

A family plugs in through one of two small method sets (no family names here):

  encoder-decoder (SimVLM, Prismer): `encode(batch) -> (encoded [B, S, D], encoder_mask
      [B, S])` and `decode(encoded, encoder_mask, tokens, positions=..., key_mask=...,
      key_positions=..., decode=True)`. The encoder (image + SimVLM's text prefix) runs
      once. The decoder starts from BOS, or from a decoder prompt (`tokens` + `token_mask`
      rows as below: Prismer's question before its answer) laid out like a decoder-only one.
  decoder-only (MiniGPT-v2, CogAgent, Flamingo): `embed_inputs(batch) -> (x [B, T, D],
      token_mask [B, T], extra)`, `embed_generated(tokens [B, 1]) -> [B, 1, D]`,
      `generation_extra(extra, last [B]) -> extra` for one generated token (what it sees of
      the static inputs: media, high-res features, token types), and `lm` (a DecoderLM).
      Prompts are `tokens` rows whose `token_mask` is a prefix of the row (lengths differ
      per row); the prompt chunk fills cache slots 0..T-1 (padding masked as keys) and
      generated token i of every row goes to slot T + i, with rotary/learned position
      `length_b + i`, so a row continues exactly as if its prompt had no padding.

Everything runs in one jitted program per (model, shapes, options): prefill, then a
`lax.scan` of single-token cached steps. The prefill caches the self-attention keys/values
and the cross-attention ones (of the encoder output, Flamingo's media, CogAgent's high-res
features); the steps read both from the cache (`encoded` / the extra's media None).

Outputs (`Generated`): tokens [B, L] (EOS included, then PAD), log_probs [B, L] (log-softmax
of the model's logits at the chosen token, 0 after EOS), scores [B] (sum of log_probs; beam:
the length-penalised score). Beam search returns the best beam; `beams` holds all K.
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax import distributed

# Defaults: the shipped vocabulary's ids (docs/architecture.md); evaluation passes its Vocab's.
PAD_ID, EOS_ID, BOS_ID = 0, 1, 3
NEG_INF = -1e9


class Generated(NamedTuple):
  tokens: jax.Array  # [B, L] int32
  log_probs: jax.Array  # [B, L] f32
  scores: jax.Array  # [B] f32
  beams: Any = None  # beam search: (tokens [B, K, L], scores [B, K]), best first


# ----------------------------------------------------------------------------------------
# Family adapters: prefill(params, batch, max_len) -> (logits [B, V], cache, state) and
# step(params, cache, state, tokens [B], i) -> (logits [B, V], cache).
# ----------------------------------------------------------------------------------------
def _zeros_like_shapes(tree):
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)


class _Adapter:
  """Hashable by model, so jit reuses its compilations (the adapter is a static arg)."""

  def __init__(self, model):
    self.model = model

  def __eq__(self, other):
    return type(self) is type(other) and self.model == other.model

  def __hash__(self):
    return hash((type(self), self.model))


class _EncoderDecoder(_Adapter):

  def _decoder(self, params, cache, encoded, encoder_mask, tokens, positions, keys):
    variables = {"params": params} if cache is None else {"params": params, "cache": cache}
    key_mask, key_positions = keys
    logits, mutated = self.model.apply(
        variables, encoded, encoder_mask, tokens, positions=positions, key_mask=key_mask,
        key_positions=key_positions, decode=True, method="decode", mutable=["cache"])
    return logits, mutated["cache"]

  def prefill(self, params, batch, max_len, bos_id):
    encoded, encoder_mask = self.model.apply({"params": params}, batch, method="encode")
    batch_size = encoded.shape[0]
    if "token_mask" in batch:  # a decoder prompt per row, BOS first
      prompt, valid = batch["tokens"].astype(jnp.int32), batch["token_mask"] > 0
    else:
      prompt = jnp.full((batch_size, 1), bos_id, jnp.int32)
      valid = jnp.ones((batch_size, 1), bool)
    length = prompt.shape[1]
    lengths = valid.sum(axis=1).astype(jnp.int32)
    # Generated token i of a row sits in cache slot T + i at position length_b + i; the last
    # one is never fed back, so the cache (and a position table) needs T + max_len - 1.
    slots = jnp.arange(length + max_len - 1, dtype=jnp.int32)
    keys = (jnp.concatenate([valid, jnp.ones((batch_size, max_len - 1), bool)], axis=1),
            jnp.where(slots < length, slots, slots - length + lengths[:, None]))
    full = jnp.zeros((batch_size, length + max_len - 1), jnp.int32)
    cache = _zeros_like_shapes(jax.eval_shape(
        lambda: self._decoder(params, None, encoded, encoder_mask, full, None, keys)[1]))
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), prompt.shape)
    logits, cache = self._decoder(params, cache, encoded, encoder_mask, prompt, positions, keys)
    last = jnp.maximum(lengths - 1, 0)
    logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
    return logits, cache, (encoder_mask, lengths, keys)

  def step(self, params, cache, state, tokens, i):
    encoder_mask, lengths, keys = state
    logits, cache = self._decoder(params, cache, None, encoder_mask, tokens[:, None],
                                  (lengths + i)[:, None], keys)
    return logits[:, -1], cache


def _lm_cached(module, x, positions, key_mask, extra):
  hidden = module.lm.trunk(x, attention_mask=key_mask[:, None, None, :], positions=positions,
                           extra=extra, decode=True)
  return module.lm.logits(hidden[:, -1:])[:, 0]


class _DecoderOnly(_Adapter):

  def _lm(self, params, cache, x, positions, key_mask, extra):
    variables = {"params": params} if cache is None else {"params": params, "cache": cache}
    logits, mutated = self.model.apply(variables, x, positions, key_mask, extra,
                                       method=_lm_cached, mutable=["cache"])
    return logits, mutated["cache"]

  def prefill(self, params, batch, max_len, bos_id):
    del bos_id  # prompts carry their own BOS
    x, token_mask, extra = self.model.apply({"params": params}, batch, method="embed_inputs")
    batch_size, length = x.shape[:2]
    valid = token_mask > 0
    lengths = valid.sum(axis=1).astype(jnp.int32)
    key_mask = jnp.concatenate([valid, jnp.ones((batch_size, max_len), bool)], axis=1)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch_size, length))
    last = jnp.maximum(lengths - 1, 0)
    step_extra = self.model.apply({"params": params}, extra, last, method="generation_extra")
    # The cache-creating call sizes the buffers (only its shapes are used): the one-token
    # extra broadcasts over its length, with the cross-attended inputs (None in the steps'
    # extra: read from the cache) taken from the prompt's.
    creation_extra = step_extra and {k: extra[k] if v is None else v
                                     for k, v in step_extra.items()}
    full = jnp.zeros((batch_size, length + max_len) + x.shape[2:], x.dtype)
    cache = _zeros_like_shapes(jax.eval_shape(lambda: self._lm(
        params, None, full, jnp.zeros(full.shape[:2], jnp.int32), key_mask, creation_extra)[1]))
    # The prompt chunk's logits at each row's last real token predict its first new token.
    variables = {"params": params, "cache": cache}

    def prompt_logits(module):
      hidden = module.lm.trunk(x, attention_mask=key_mask[:, None, None, :],
                               positions=positions, extra=extra, decode=True)
      hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)
      return module.lm.logits(hidden)[:, 0]

    logits, mutated = self.model.apply(variables, method=prompt_logits, mutable=["cache"])
    return logits, mutated["cache"], (lengths, key_mask, step_extra)

  def step(self, params, cache, state, tokens, i):
    lengths, key_mask, extra = state
    x = self.model.apply({"params": params}, tokens[:, None], method="embed_generated")
    return self._lm(params, cache, x, (lengths + i)[:, None], key_mask, extra)


def adapter_for(model):
  if hasattr(model, "encode") and hasattr(model, "decode"):
    return _EncoderDecoder(model)
  if all(hasattr(model, m) for m in ("embed_inputs", "embed_generated", "generation_extra")):
    return _DecoderOnly(model)
  raise TypeError(f"{type(model).__name__} exposes neither encode/decode nor "
                  "embed_inputs/embed_generated/generation_extra (see vlm_jax/decode.py).")


# ----------------------------------------------------------------------------------------
# Token choice
# ----------------------------------------------------------------------------------------
def filter_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """Logits [B, V] scaled by 1/temperature with all but the top-k / the smallest set of
  tokens whose probability reaches top_p set to -inf (0 / 1.0: no filter)."""
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if not isinstance(top_p, (int, float)) or top_p < 1.0:  # traced: always filter
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def _choose(logits, rng, i, options, top_k):
  if top_k is None:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  temperature, top_p = options
  filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(jax.random.fold_in(rng, i), filtered).astype(jnp.int32)


# Special ids, temperature and top_p are traced (changing them does not recompile); top_k
# (None: greedy) is static for lax.top_k.
@distributed.jit(static_argnames=("adapter", "max_len", "top_k"))
def _search(params, batch, rng, ids, options, *, adapter, max_len, top_k):
  bos_id, eos_id, pad_id = ids
  logits, cache, state = adapter.prefill(params, batch, max_len, bos_id)
  batch_size = logits.shape[0]

  def pick(logits, done, i):
    token = _choose(logits, rng, i, options, top_k)
    log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)),
                                   token[:, None], axis=1)[:, 0]
    token = jnp.where(done, pad_id, token)
    return token, jnp.where(done, 0.0, log_prob), done | (token == eos_id)

  first, first_lp, done = pick(logits, jnp.zeros((batch_size,), bool), 0)

  def step(carry, i):
    cache, token, done = carry
    logits, cache = adapter.step(params, cache, state, token, i)
    token, log_prob, done = pick(logits, done, i + 1)
    return (cache, token, done), (token, log_prob)

  _, (rest, rest_lp) = jax.lax.scan(step, (cache, first, done), jnp.arange(max_len - 1))
  tokens = jnp.concatenate([first[:, None], rest.T], axis=1)
  log_probs = jnp.concatenate([first_lp[:, None], rest_lp.T], axis=1)
  return Generated(tokens, log_probs, log_probs.sum(axis=1))


# ----------------------------------------------------------------------------------------
# Beam search (t5x-style: 2K candidates per step, K alive, K finished)
# ----------------------------------------------------------------------------------------
def length_penalty(length, alpha: float):
  """GNMT's ((5 + length) / 6) ** alpha (alpha 0: plain log-probability)."""
  return ((5.0 + length) / 6.0) ** alpha


def _gather_beams(tree, beam_index, batch_size, beams):
  """Reorders the flat [B*K, ...] batch axis of the self-attention caches by beam_index
  [B, K]. Cache arrays keep the batch axis 4th from the end ([..., B, S, heads, head_dim]);
  scalars (cache indices) are shared, and the cross-attention keys/values are the same for
  every beam of an example, so they stay where they are."""
  flat = (beam_index + jnp.arange(batch_size)[:, None] * beams).reshape(-1)

  def gather(path, a):
    if a.ndim < 4 or getattr(path[-1], "key", None) in ("cross_key", "cross_value"):
      return a
    return jnp.take(a, flat, axis=a.ndim - 4)

  return jax.tree_util.tree_map_with_path(gather, tree)


@distributed.jit(static_argnames=("adapter", "max_len", "beams"))
def _beam_search(params, batch, ids, alpha, *, adapter, max_len, beams):
  bos_id, eos_id, pad_id = ids
  batch = jax.tree.map(lambda a: jnp.repeat(a, beams, axis=0), batch)
  logits, cache, state = adapter.prefill(params, batch, max_len, bos_id)
  batch_size = logits.shape[0] // beams
  vocab = logits.shape[-1]
  # Only beam 0 of each example is alive at the start (the K copies are identical).
  alive_lp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (beams - 1)), (batch_size, 1))
  alive_seq = jnp.full((batch_size, beams, max_len), pad_id, jnp.int32)
  alive_tok_lp = jnp.zeros((batch_size, beams, max_len), jnp.float32)
  fin_seq, fin_tok_lp = alive_seq, alive_tok_lp
  fin_score = jnp.full((batch_size, beams), NEG_INF)

  def expand(carry, logits, i):
    cache, alive_seq, alive_tok_lp, alive_lp, fin_seq, fin_tok_lp, fin_score = carry
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch_size, beams, vocab)
    candidates = (alive_lp[..., None] + log_probs).reshape(batch_size, beams * vocab)
    top_lp, top_index = jax.lax.top_k(candidates, 2 * beams)  # [B, 2K]
    origin, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
    token_lp = jnp.take_along_axis(log_probs.reshape(batch_size, -1), top_index, axis=1)
    seq = jnp.take_along_axis(alive_seq, origin[..., None], axis=1).at[:, :, i].set(token)
    tok_lp = jnp.take_along_axis(alive_tok_lp, origin[..., None], axis=1).at[:, :, i].set(
        token_lp)
    is_eos = token == eos_id
    # Alive: the best K candidates that did not just end.
    alive_rank = jnp.where(is_eos, NEG_INF, top_lp)
    new_lp, keep = jax.lax.top_k(alive_rank, beams)
    take = lambda a: jnp.take_along_axis(a, keep[..., None], axis=1)
    cache = _gather_beams(cache, jnp.take_along_axis(origin, keep, axis=1), batch_size, beams)
    new_alive_seq, new_alive_tok_lp = take(seq), take(tok_lp)
    new_token = jnp.take_along_axis(token, keep, axis=1).reshape(-1)
    # Finished: the best K among the old finished and the candidates that just ended among
    # the top K (as in HF transformers: an EOS ranked below them does not end a beam, so
    # beam size 1 is greedy search).
    in_top_k = jnp.arange(2 * beams) < beams
    ended = jnp.where(is_eos & in_top_k & (top_lp > NEG_INF / 2),
                      top_lp / length_penalty(i + 1, alpha), NEG_INF)
    all_score = jnp.concatenate([fin_score, ended], axis=1)
    fin_score, best = jax.lax.top_k(all_score, beams)
    pick = lambda old, new: jnp.take_along_axis(jnp.concatenate([old, new], axis=1),
                                                best[..., None], axis=1)
    fin_seq, fin_tok_lp = pick(fin_seq, seq), pick(fin_tok_lp, tok_lp)
    carry = (cache, new_alive_seq, new_alive_tok_lp, new_lp, fin_seq, fin_tok_lp, fin_score)
    return carry, new_token

  carry = (cache, alive_seq, alive_tok_lp, alive_lp, fin_seq, fin_tok_lp, fin_score)
  carry, token = expand(carry, logits, 0)

  def step(scan_carry, i):
    carry, token = scan_carry
    logits, cache = adapter.step(params, carry[0], state, token, i)
    carry, token = expand((cache,) + carry[1:], logits, i + 1)
    return (carry, token), None

  (carry, _), _ = jax.lax.scan(step, (carry, token), jnp.arange(max_len - 1))
  _, alive_seq, alive_tok_lp, alive_lp, fin_seq, fin_tok_lp, fin_score = carry
  # Beams still alive at max_len end there (penalised at that length) and compete with the
  # finished ones, so a row always returns K beams.
  alive_score = jnp.where(alive_lp > NEG_INF / 2, alive_lp / length_penalty(max_len, alpha),
                          NEG_INF)
  scores, best = jax.lax.top_k(jnp.concatenate([fin_score, alive_score], axis=1), beams)
  pick = lambda fin, alive: jnp.take_along_axis(jnp.concatenate([fin, alive], axis=1),
                                                best[..., None], axis=1)
  seqs, tok_lp = pick(fin_seq, alive_seq), pick(fin_tok_lp, alive_tok_lp)
  return Generated(seqs[:, 0], tok_lp[:, 0], scores[:, 0], beams=(seqs, scores))


# ----------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------
def generate(model, params, batch, max_len: int, *, method: str = "greedy", beams: int = 4,
             length_alpha: float = 0.0, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, rng=None, bos_id: int = BOS_ID, eos_id: int = EOS_ID,
             pad_id: int = PAD_ID) -> Generated:
  """Up to `max_len` new tokens per example of `batch` (the model's own batch layout; see
  the module docstring). method: 'greedy' | 'sample' | 'beam'. `params` is unboxed (global
  arrays in a multi-process job, where every process passes the same batch); the outputs are
  host numpy arrays in every process."""
  if max_len < 1:
    raise ValueError(f"max_len={max_len}: need at least one token.")
  adapter = adapter_for(model)
  # Host arrays: in a multi-process job jit takes them as the same global value everywhere.
  batch = {k: np.asarray(v) for k, v in batch.items()
           if k not in ("targets", "loss_mask", "loss_weight")}
  ids = jnp.array([bos_id, eos_id, pad_id], jnp.int32)
  if method == "beam":
    if beams < 1:
      raise ValueError(f"beams={beams}: need at least 1.")
    return distributed.fetch(_beam_search(params, batch, ids, jnp.float32(length_alpha),
                                          adapter=adapter, max_len=max_len, beams=beams))
  if method == "greedy":
    top_k = None
  elif method == "sample":
    if temperature <= 0 or not 0 < top_p <= 1 or top_k < 0:
      raise ValueError(f"sampling needs temperature > 0, 0 < top_p <= 1, top_k >= 0; got "
                       f"{temperature}, {top_p}, {top_k}.")
    top_k = int(top_k)
  else:
    raise ValueError(f"method={method!r}: expected 'greedy', 'sample' or 'beam'.")
  rng = jax.random.key(0) if rng is None else rng
  options = (jnp.float32(temperature), jnp.float32(top_p))
  return distributed.fetch(_search(params, batch, rng, ids, options, adapter=adapter,
                                   max_len=max_len, top_k=top_k))
