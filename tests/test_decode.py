"""vlm_jax.decode: cached generation equals full recomputation for every family; beam search
and sampling behave as specified."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import builders
from vlm_jax import decode as decode_lib

V, NEW = 64, 5
LENGTHS = np.array([9, 13])  # prompts of different lengths in one batch (T = 16)


def _uniform(key, shape):
  return jax.random.uniform(key, shape, minval=-1, maxval=1)


def _prompt_batch(key, length=16, low=6):
  tokens = jax.random.randint(key, (2, length), low, V)
  mask = (np.arange(length)[None] < LENGTHS[:, None]).astype(np.float32)
  return {"tokens": tokens, "token_mask": jnp.asarray(mask)}


def _simvlm_model(**lm):
  return builders.build(
      "simvlm", lm=dict(vocab_size=V, width=32, num_heads=4, mlp_dim=48, encoder_layers=1,
                        decoder_layers=2, **lm),
      vision=dict(width=8, stage_blocks=(1, 1, 1)), dropout_rate=0.0, drop_path_rate=0.0)


def _simvlm():
  model = _simvlm_model(max_text_length=8)
  k1, k2 = jax.random.split(jax.random.key(1))
  batch = {"images": _uniform(k1, (2, 1, 32, 32, 3)), "image_mask": jnp.ones((2, 1)),
           "prefix_tokens": jax.random.randint(k2, (2, 4), 4, V),
           "prefix_mask": jnp.array([[1, 1, 0, 0], [1, 1, 1, 1]], jnp.float32)}
  init_batch = dict(batch, tokens=jnp.zeros((2, NEW), jnp.int32),
                    loss_mask=jnp.ones((2, NEW)))
  return model, batch, init_batch


def _simvlm_decoder_prompt():
  """T5-style relative positions and a decoder prompt per row (lengths differ): generated
  tokens' key positions skip each row's prompt padding."""
  model = _simvlm_model(max_text_length=24, position="relative")
  k1, k2, k3 = jax.random.split(jax.random.key(5), 3)
  batch = dict(_prompt_batch(k3), images=_uniform(k1, (2, 1, 32, 32, 3)),
               image_mask=jnp.ones((2, 1)), prefix_tokens=jax.random.randint(k2, (2, 4), 4, V),
               prefix_mask=jnp.ones((2, 4)))
  return model, batch, dict(batch, loss_mask=batch["token_mask"])


def _prismer():
  """Encoder-decoder with a decoder prompt (Prismer's question before its answer)."""
  model = builders.build(
      "prismer", lm=dict(vocab_size=V, width=32, num_layers=2, num_heads=4, mlp_dim=48,
                         max_text_length=32),
      vision=dict(width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=8, image_size=16,
                  experts=("depth",), num_latents=4, resampler_layers=1, resampler_heads=2),
      freeze="freeze_lang_vision", adaptor_ratio=1, dropout_rate=0.0)
  k1, k2, k3 = jax.random.split(jax.random.key(6), 3)
  batch = dict(_prompt_batch(k3), images=_uniform(k1, (2, 1, 16, 16, 3)),
               expert_depth=_uniform(k2, (2, 16, 16, 1)))
  return model, batch, dict(batch, loss_mask=batch["token_mask"])


def _minigpt():
  model = builders.build(
      "minigpt_v2", lm=dict(vocab_size=V, width=32, num_layers=2, num_heads=4, mlp_dim=48,
                            lora_targets=("query", "value"), lora_rank=4),
      vision=dict(width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=14, class_token=True),
      group_size=4)
  k1, k2 = jax.random.split(jax.random.key(2))
  batch = dict(_prompt_batch(k1), images=_uniform(k2, (2, 1, 56, 56, 3)),
               image_mask=jnp.ones((2, 1)), image_positions=jnp.array([[2], [3]], jnp.int32))
  return model, batch, batch


def _cogagent():
  vit = dict(depth=1, num_heads=2, mlp_dim=32, patch_size=14, class_token=True)
  model = builders.build(
      "cogagent", lm=dict(vocab_size=V, width=32, num_layers=2, num_heads=4, mlp_dim=48),
      vision=dict(vit, width=16), high_res=dict(vit, width=24), adapter=dict(mlp_dim=40),
      cross=dict(width=16, heads=4), visual_expert=True, cross_module=True)
  k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
  batch = dict(_prompt_batch(k1), images=_uniform(k2, (2, 1, 28, 28, 3)),
               high_res_images=_uniform(k3, (2, 1, 56, 56, 3)), image_mask=jnp.ones((2, 1)),
               image_positions=jnp.array([[1], [3]], jnp.int32))
  return model, batch, batch


def _flamingo():
  model = builders.build(
      "flamingo", lm=dict(vocab_size=V, width=32, num_layers=4, num_heads=4, mlp_dim=48),
      vision=dict(width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=8, class_token=True,
                  pre_norm=True, patch_bias=False, mlp_activation="quick_gelu"),
      resampler=dict(num_layers=1, num_latents=3, num_heads=2, head_dim=8),
      xattn=dict(num_heads=2, head_dim=8), xattn_group=2, xattn_sublayers=(1,),
      only_attend_immediate=True, new_token_ids=(4, 5))
  k1, k2 = jax.random.split(jax.random.key(4))
  batch = _prompt_batch(k1)
  positions = jnp.array([[1, 6, 0], [2, 0, 0]], jnp.int32)
  present = jnp.array([[1, 1, 0], [1, 0, 0]], jnp.float32)
  tokens = batch["tokens"].at[0, 1].set(4).at[0, 6].set(4).at[1, 2].set(4)  # <image>
  batch = dict(batch, tokens=tokens, images=_uniform(k2, (2, 3, 16, 16, 3)),
               image_mask=present, image_positions=positions)
  return model, batch, batch


FAMILIES = {"simvlm": _simvlm, "simvlm_decoder_prompt": _simvlm_decoder_prompt,
            "prismer": _prismer, "minigpt_v2": _minigpt, "cogagent": _cogagent,
            "flamingo": _flamingo}


def _init(model, init_batch):
  return nn.unbox(jax.jit(model.init)(jax.random.key(0), init_batch))["params"]


class FullForward:
  """Log-probs [B, L, V] over the generated positions from a full forward of prompt +
  generated tokens (no cache), jitted once per family."""

  def __init__(self, name, model, params, batch):
    self.name, self.batch = name, batch
    self.apply = jax.jit(lambda b: model.apply({"params": params}, b))

  def __call__(self, generated):
    generated, batch = np.asarray(generated), self.batch
    if "tokens" not in batch:  # encoder-decoder from BOS
      inputs = np.concatenate([np.full((2, 1), decode_lib.BOS_ID), generated[:, :-1]], axis=1)
      logits = self.apply(dict(batch, tokens=jnp.asarray(inputs),
                               loss_mask=jnp.ones(inputs.shape)))
      return np.asarray(jax.nn.log_softmax(logits))
    length = batch["tokens"].shape[1] + NEW
    tokens = np.zeros((2, length), np.int32)
    for b, n in enumerate(LENGTHS):  # each prompt extended in place, then padding
      tokens[b, :n] = np.asarray(batch["tokens"])[b, :n]
      tokens[b, n:n + NEW] = generated[b]
    mask = jnp.asarray((np.arange(length)[None] < (LENGTHS + NEW)[:, None]), jnp.float32)
    # Decoder-only families read token_mask; encoder-decoder ones their decoder's loss_mask.
    logits = self.apply(dict(batch, tokens=jnp.asarray(tokens), token_mask=mask, loss_mask=mask))
    rows = LENGTHS[:, None] - 1 + np.arange(NEW)[None]
    return np.asarray(jax.nn.log_softmax(np.asarray(logits)[np.arange(2)[:, None], rows]))


def _chosen(log_probs, tokens):
  return np.take_along_axis(log_probs, np.asarray(tokens)[..., None], -1)[..., 0]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_cached_decoding_equals_full_recomputation_and_beam_search(name):
  model, batch, init_batch = FAMILIES[name]()
  params = _init(model, init_batch)
  if name == "flamingo":  # open the tanh gates so the media matter
    flat = traverse_util.flatten_dict(params, sep="/")
    params = traverse_util.unflatten_dict(
        {k: (jnp.full_like(v, 0.7) if k.endswith("_gate") else v) for k, v in flat.items()},
        sep="/")
  full = FullForward(name, model, params, batch)

  # Greedy: same tokens and log-probs as re-running everything for every new token.
  out = decode_lib.generate(model, params, batch, NEW, eos_id=-1)
  assert out.tokens.shape == (2, NEW) and out.tokens.dtype == jnp.int32
  log_probs = full(out.tokens)
  np.testing.assert_array_equal(np.argmax(log_probs, -1), out.tokens)
  np.testing.assert_allclose(out.log_probs, _chosen(log_probs, out.tokens), rtol=1e-4,
                             atol=1e-4)
  np.testing.assert_allclose(out.scores, out.log_probs.sum(1), rtol=1e-5, atol=1e-5)

  # An EOS that greedy emits: padding after it; beam size 1 is greedy, EOS included.
  eos = int(out.tokens[1, 2])
  greedy = decode_lib.generate(model, params, batch, NEW, eos_id=eos)
  hit = np.flatnonzero(np.asarray(greedy.tokens[1]) == eos)[0]
  assert hit <= 2 and np.all(np.asarray(greedy.tokens[1, hit + 1:]) == decode_lib.PAD_ID)
  beam = decode_lib.generate(model, params, batch, NEW, method="beam", beams=1, eos_id=eos)
  np.testing.assert_array_equal(beam.tokens, greedy.tokens)
  np.testing.assert_allclose(beam.scores, greedy.scores, rtol=1e-5, atol=1e-5)

  # Beam 3 with a length penalty: every beam's score is its length-penalised log-prob under
  # the full forward, beams are sorted, and the best is no worse than greedy. (One family
  # per path suffices: the search is family-agnostic; this keeps test time down.)
  if name not in ("simvlm", "flamingo"):
    return
  alpha, beams = 0.6, 3
  out = decode_lib.generate(model, params, batch, NEW, method="beam", beams=beams,
                            length_alpha=alpha, eos_id=eos)
  seqs, scores = map(np.asarray, out.beams)
  assert seqs.shape == (2, beams, NEW) and np.all(np.diff(scores, axis=1) <= 1e-6)
  lengths = np.where((seqs == eos).any(-1), np.argmax(seqs == eos, -1) + 1, NEW)
  for k in range(beams):
    log_probs = _chosen(full(seqs[:, k]), seqs[:, k])
    for b in range(2):
      n = lengths[b, k]
      assert np.all(seqs[b, k, n:] == decode_lib.PAD_ID)
      np.testing.assert_allclose(scores[b, k],
                                 log_probs[b, :n].sum() / decode_lib.length_penalty(n, alpha),
                                 rtol=1e-4, atol=1e-4)
  greedy_lengths = np.sum(np.asarray(greedy.tokens) != decode_lib.PAD_ID, axis=1)
  greedy_scores = np.asarray(greedy.scores) / decode_lib.length_penalty(greedy_lengths, alpha)
  assert np.all(scores[:, 0] >= greedy_scores - 1e-4)


def test_sampling_scores_and_limits():
  model, batch, init_batch = _minigpt()
  params = _init(model, init_batch)
  greedy = decode_lib.generate(model, params, batch, NEW, eos_id=-1)
  sampled = decode_lib.generate(model, params, batch, NEW, method="sample", eos_id=-1,
                                rng=jax.random.key(7))
  full = FullForward("minigpt_v2", model, params, batch)
  np.testing.assert_allclose(sampled.log_probs, _chosen(full(sampled.tokens), sampled.tokens),
                             rtol=1e-4, atol=1e-4)
  for options in (dict(top_k=1), dict(temperature=1e-4), dict(top_p=1e-6)):
    out = decode_lib.generate(model, params, batch, NEW, method="sample", eos_id=-1,
                              rng=jax.random.key(3), **options)
    np.testing.assert_array_equal(out.tokens, greedy.tokens)
  draws = [decode_lib.generate(model, params, batch, NEW, method="sample", eos_id=-1,
                               rng=jax.random.key(s)).tokens for s in range(3)]
  assert any(not np.array_equal(draws[0], d) for d in draws[1:])


def test_filter_logits_by_hand():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
  kept = lambda **kw: np.isfinite(decode_lib.filter_logits(logits, **kw))
  # top_p 0.7: 0.5 alone is below 0.7, 0.5 + 0.3 reaches it -> the two most likely.
  np.testing.assert_array_equal(kept(top_p=0.7), [[1, 1, 0, 0], [0, 0, 1, 1]])
  np.testing.assert_array_equal(kept(top_p=0.9), [[1, 1, 1, 0], [0, 1, 1, 1]])
  np.testing.assert_array_equal(kept(top_k=1), [[1, 0, 0, 0], [0, 0, 0, 1]])
  np.testing.assert_allclose(decode_lib.filter_logits(logits, temperature=2.0), logits / 2)


def test_bad_options_raise():
  model, batch, init_batch = _simvlm()
  params = _init(model, init_batch)
  with pytest.raises(ValueError, match="max_text_length"):
    decode_lib.generate(model, params, batch, 9)
  with pytest.raises(ValueError, match="method"):
    decode_lib.generate(model, params, batch, 4, method="nucleus")
  with pytest.raises(ValueError, match="temperature"):
    decode_lib.generate(model, params, batch, 4, method="sample", temperature=0.0)
  with pytest.raises(TypeError, match="encode/decode"):
    decode_lib.generate(object(), params, batch, 4)
