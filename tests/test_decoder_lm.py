"""DecoderLM: causality, padding, scan/remat/grouping equivalence, KV cache, HF LLaMA parity."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.nn import decoder_lm, transformer

VOCAB, WIDTH, LAYERS, HEADS, KV_HEADS, MLP = 64, 32, 2, 4, 2, 48
LLAMA = dict(vocab_size=VOCAB, width=WIDTH, num_layers=LAYERS, num_heads=HEADS,
             num_kv_heads=KV_HEADS, mlp_dim=MLP)


def _init(model, tokens):
  return nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens))["params"]


def _apply(model, params, *args, **kwargs):
  """Jitted apply: one compile per shape is much faster on CPU than op-by-op dispatch."""
  return jax.jit(model.apply, static_argnames=("decode", "mutable"))(
      {"params": params}, *args, **kwargs)


def _tokens(batch=2, length=10, seed=1):
  return jax.random.randint(jax.random.key(seed), (batch, length), 4, VOCAB)


@pytest.fixture(scope="module")
def llama():
  model = decoder_lm.DecoderLM(**LLAMA)
  return model, _init(model, _tokens())


def test_causal(llama):
  model, params = llama
  tokens = _tokens()
  changed = tokens.at[:, 6].set((tokens[:, 6] + 1) % VOCAB)
  a = _apply(model, params, tokens)
  b = _apply(model, params, changed)
  np.testing.assert_array_equal(a[:, :6], b[:, :6])
  assert not np.allclose(a[:, 6:], b[:, 6:])


def test_padding_does_not_change_valid_positions(llama):
  model, params = llama
  tokens = _tokens(length=7)
  padded = jnp.concatenate([tokens, _tokens(length=5, seed=9)], axis=1)  # junk padding
  mask = jnp.concatenate([jnp.ones((2, 7)), jnp.zeros((2, 5))], axis=1)
  short = _apply(model, params, tokens)
  long = _apply(model, params, padded, token_mask=mask)
  np.testing.assert_allclose(long[:, :7], short, atol=1e-5)
  assert np.isfinite(np.asarray(long)).all()


def test_left_padding_with_positions(llama):
  model, params = llama
  tokens = _tokens(length=6)
  padded = jnp.concatenate([jnp.zeros((2, 3), jnp.int32), tokens], axis=1)
  mask = jnp.concatenate([jnp.zeros((2, 3)), jnp.ones((2, 6))], axis=1)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
  short = _apply(model, params, tokens)
  long = _apply(model, params, padded, token_mask=mask, positions=positions)
  np.testing.assert_allclose(long[:, 3:], short, atol=1e-5)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scan_equals_unscanned(llama, remat):
  model, params = llama
  unscanned = decoder_lm.DecoderLM(**LLAMA, scan_layers=False, remat_policy=remat)
  p = _init(unscanned, _tokens())
  stacked = dict(p, layers=transformer.stack_unscanned_params(p["layers"], LAYERS))
  tokens = _tokens()
  np.testing.assert_allclose(_apply(model, stacked, tokens),
                             _apply(unscanned, p, tokens), atol=1e-5)


def test_layer_groups_equal_plain_stack(llama):
  model, params = llama
  grouped = decoder_lm.DecoderLM(**LLAMA, layers_per_unit=2)
  p = _init(grouped, _tokens())
  assert set(p["layers"]["layers"]) == {"sublayer_0", "sublayer_1"}
  converted = dict(params, layers={"layers": decoder_lm.group_layer_params(
      params["layers"]["layers"], 2)})
  jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), converted, p)
  tokens = _tokens()
  np.testing.assert_allclose(_apply(grouped, converted, tokens),
                             _apply(model, params, tokens), atol=1e-5)


def test_prefix_lm_mask():
  flags = jnp.array([[0, 0, 1, 1], [1, 1, 1, 1]])
  mask = decoder_lm.prefix_lm_mask(flags)[:, 0]
  expected0 = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], bool)
  np.testing.assert_array_equal(mask[0], expected0)
  np.testing.assert_array_equal(mask[1], np.tril(np.ones((4, 4), bool)))


def _decode(model, params, tokens, chunks):
  """Feeds `tokens` in the given chunk lengths through the KV cache; returns all logits."""
  full = jnp.zeros_like(tokens)
  shapes = jax.eval_shape(lambda: model.apply({"params": params}, full, decode=True,
                                              mutable=["cache"])[1])
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)["cache"]
  step = jax.jit(lambda cache, chunk: model.apply({"params": params, "cache": cache}, chunk,
                                                 decode=True, mutable=["cache"]))
  outs, start = [], 0
  for n in chunks:
    logits, mutated = step(cache, tokens[:, start:start + n])
    cache, start = mutated["cache"], start + n
    outs.append(logits)
  return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("chunks", [(1,) * 8, (5, 1, 1, 1)])
def test_kv_cache_decoding_equals_full_forward(llama, chunks):
  model, params = llama
  tokens = _tokens(length=8)
  np.testing.assert_allclose(_decode(model, params, tokens, chunks),
                             _apply(model, params, tokens), atol=1e-5)


def test_neox_and_mpt_style_variants_decode_consistently():
  for kwargs in (dict(norm_type="layernorm", use_bias=True, mlp_activation="gelu",
                      parallel_residual=True),  # GPT-NeoX / RedPajama
                 dict(norm_type="layernorm", mlp_activation="gelu", tie_embeddings=True,
                      position="alibi"),  # MPT
                 dict(norm_type="layernorm", mlp_activation="gelu", tie_embeddings=True,
                      position="learned", max_length=16)):  # MPT with learned positions
    model = decoder_lm.DecoderLM(**dict(LLAMA, num_kv_heads=None), **kwargs)
    tokens = _tokens(length=6)
    params = _init(model, tokens)
    full = _apply(model, params, tokens)
    if model.position == "learned":  # learned positions need explicit decode positions
      continue
    np.testing.assert_allclose(_decode(model, params, tokens, (1,) * 6), full, atol=1e-5)


class _ExtraBiasLayer(transformer.Layer):
  """A subclass adding `context.extra['bias']` after the attention block (hook test)."""

  @nn.compact
  def __call__(self, x, context, deterministic=True, decode=False):
    x = self.self_attention_block(x, context, deterministic, decode)
    x = x + context.extra["bias"]
    return self.mlp_block(x, context, deterministic)


def test_layer_subclass_receives_extra_context(llama):
  model, params = llama
  custom = decoder_lm.DecoderLM(**LLAMA, layer_cls=_ExtraBiasLayer)
  tokens = _tokens()
  zero = {"bias": jnp.zeros((2, 10, WIDTH))}
  np.testing.assert_allclose(_apply(custom, params, tokens, extra=zero),
                             _apply(model, params, tokens), atol=1e-6)
  one = {"bias": jnp.ones((2, 10, WIDTH))}
  assert not np.allclose(_apply(custom, params, tokens, extra=one),
                         _apply(model, params, tokens))


def test_embed_trunk_logits_compose(llama):
  model, params = llama
  tokens = _tokens()

  def split(module, tokens):
    return module.logits(module.trunk(module.embed(tokens)))
  np.testing.assert_allclose(jax.jit(nn.apply(split, model))({"params": params}, tokens),
                             _apply(model, params, tokens), atol=1e-6)

