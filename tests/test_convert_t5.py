"""T5 v1.1 into SimVLM's text encoder-decoder (position='relative', RMSNorm, GeGLU, no
biases) against transformers' T5ForConditionalGeneration (random, no download): encoder
states and decoder logits with padding; round trip; cached decoding with the relative
bias equals the full forward."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import builders
from vlm_jax import convert
from vlm_jax.nn import relative_position
from vlm_jax.train import init_weights

T5_LIKE = dict(lm=dict(vocab_size=64, width=32, num_heads=4, head_dim=16, mlp_dim=48,
                       encoder_layers=2, decoder_layers=2, mlp_activation="geglu",
                       norm_type="rmsnorm", position="relative", use_bias=False,
                       tie_embeddings=False, relative_buckets=8, relative_max_distance=20),
               vision=dict(width=8, stage_blocks=(1, 1, 1)), dropout_rate=0.0,
               drop_path_rate=0.0)
PREFIX = np.array([[5, 9, 13, 17, 21, 25, 29, 1, 0, 0, 0, 0],
                   [4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 1]])
PREFIX_MASK = PREFIX != 0
SUFFIX = np.array([[0, 7, 11, 15, 19, 0, 0, 0], [0, 3, 5, 7, 9, 11, 13, 15]])
SUFFIX_MASK = np.arange(8)[None] < [[5], [8]]
IMAGE_TOKENS = 4  # 32 px through the stride-16 stem


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  config = transformers.T5Config(
      vocab_size=64, d_model=32, d_kv=16, d_ff=48, num_layers=2, num_decoder_layers=2,
      num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
      feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
      decoder_start_token_id=0)
  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(config)
  with torch.no_grad():  # norms at 1 would hide mapping mistakes
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("t5")
  model.save_pretrained(path, safe_serialization=True)
  return model.eval(), str(path)


def batch():
  return {"images": jnp.zeros((2, 1, 32, 32, 3)), "image_mask": jnp.zeros((2, 1)),
          "prefix_tokens": jnp.asarray(PREFIX), "prefix_mask": jnp.asarray(PREFIX_MASK, float),
          "tokens": jnp.asarray(SUFFIX), "loss_mask": jnp.asarray(SUFFIX_MASK, float)}


@pytest.fixture(scope="module")
def imported(saved):
  """SimVLM params: T5's text path imported (config.init.lm's route), the image embedder
  initialised (here with every image masked out, as for text-only documents)."""
  model = builders.build("simvlm", **T5_LIKE)
  fresh = convert.flatten(nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch())["params"]))
  part = init_weights.pretrained_parts(model)["lm"]
  _, target, new = init_weights.part_target(
      part, {p: jax.ShapeDtypeStruct(a.shape, a.dtype) for p, a in fresh.items()})
  assert not any(p.startswith("image_embedder/") for p in target)
  loaded = convert.load_part(saved[1], target, arch=part["arch"], new=new, log=lambda _: None)
  assert set(loaded) == set(target)
  return model, convert.unflatten({**fresh, **loaded})


def test_relative_buckets_match_transformers():
  distance = torch.arange(-40, 41)[None]
  for bidirectional in (True, False):
    want = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        distance, bidirectional=bidirectional, num_buckets=8, max_distance=20)
    got = relative_position.relative_bucket(jnp.asarray(distance.numpy(), jnp.int32),
                                            bidirectional, 8, 20)
    np.testing.assert_array_equal(np.asarray(got), want.numpy())


def test_encoder_states_and_logits_match_transformers_with_padding(saved, imported):
  hf, _ = saved
  model, params = imported
  logits = jax.jit(model.apply)({"params": params}, batch())
  encoded, _ = jax.jit(lambda p, b: model.apply({"params": p}, b, method="encode"))(
      params, batch())
  with torch.no_grad():
    out = hf(input_ids=torch.from_numpy(PREFIX),
             attention_mask=torch.from_numpy(PREFIX_MASK.astype(int)),
             decoder_input_ids=torch.from_numpy(SUFFIX),
             decoder_attention_mask=torch.from_numpy(SUFFIX_MASK.astype(int)))
  text = np.asarray(encoded)[:, IMAGE_TOKENS:]
  np.testing.assert_allclose(text[PREFIX_MASK], out.encoder_last_hidden_state.numpy()[PREFIX_MASK],
                             atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(logits)[SUFFIX_MASK], out.logits.numpy()[SUFFIX_MASK],
                             atol=1e-4, rtol=0)


def test_round_trip_reloads_identical_tensors(saved, imported, tmp_path):
  hf, _ = saved
  model, params = imported
  convert.export_hf(params, model, str(tmp_path), arch="t5", drop=(r"image_embedder/.*",))
  reloaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path)
  assert reloaded.config.feed_forward_proj == "gated-gelu"
  want, got = hf.state_dict(), reloaded.state_dict()
  assert sorted(want) == sorted(got)
  for name in want:
    assert torch.equal(want[name], got[name]), name


def test_cached_decoding_with_relative_bias_equals_full_forward(imported):
  model, params = imported
  encoded, encoder_mask = model.apply({"params": params}, batch(), method="encode")
  tokens = jnp.asarray(SUFFIX)
  full = model.apply({"params": params}, encoded, encoder_mask, tokens, method="decode")

  @jax.jit
  def step(cache, tokens, positions):
    v = {"params": params} if cache is None else {"params": params, "cache": cache}
    return model.apply(v, encoded, encoder_mask, tokens, positions=positions, decode=True,
                       method="decode", mutable=["cache"])

  shapes = jax.eval_shape(lambda: step(None, tokens, None)[1])
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)["cache"]  # as decode.py
  for t in range(tokens.shape[1]):
    logits, mutated = step(cache, tokens[:, t:t + 1], jnp.full((2, 1), t))
    cache = mutated["cache"]
    np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-5, atol=1e-5)
