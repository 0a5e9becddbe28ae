"""MPT import/export against transformers' MptForCausalLM (random small model, no download):
ALiBi slopes and bias, logits with padding, the round trip, and ALiBi under the KV cache."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.mpt import modeling_mpt

from vlm_jax import convert
from vlm_jax.nn import attention

# Row 0 right-padded, row 1 left-padded, row 2 full.
TOKENS = np.array([[3, 5, 7, 9, 11, 2, 0, 0, 0, 0], [0, 0, 0, 4, 6, 8, 10, 12, 14, 16],
                   [13, 17, 19, 23, 29, 31, 37, 41, 43, 47]])
MASK = (np.arange(10)[None] < [[6], [10], [10]]) & (np.arange(10)[None] >= [[0], [3], [0]])


def hf_mpt(heads: int, seed=0):
  config = transformers.MptConfig(d_model=8 * heads, n_heads=heads, n_layers=2,
                                  expansion_ratio=4, max_seq_len=16, vocab_size=64,
                                  attn_config={"alibi_bias_max": 8})
  torch.manual_seed(seed)
  model = transformers.MptForCausalLM(config)
  with torch.no_grad():  # norms at 1 would hide a mapping mistake
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


@pytest.fixture(scope="module", params=[4, 6], ids=["4heads", "6heads"])
def saved(request, tmp_path_factory):
  """6 heads: not a power of two, so MPT's interleaved slopes are exercised."""
  model = hf_mpt(request.param)
  path = tmp_path_factory.mktemp("mpt")
  model.save_pretrained(path, safe_serialization=True)
  return model, str(path)


@pytest.mark.parametrize("heads", [4, 6, 12])
@pytest.mark.parametrize("bias_max", [8.0, 16.0])
def test_alibi_matches_mpts_bias_tensor(heads, bias_max):
  length = 7
  want = modeling_mpt.build_mpt_alibi_tensor(heads, length, alibi_bias_max=bias_max).numpy()
  positions = jnp.arange(length)[None]
  ours = np.asarray(attention.alibi_bias(heads, positions, positions, bias_max))[0]
  # MPT's row is slope * (j - (S - 1)); ours slope * (j - i): equal for the last query and,
  # for every query, up to a constant per row (the softmax is unchanged).
  np.testing.assert_allclose(ours[:, -1], want[:, 0], rtol=1e-6, atol=0)
  np.testing.assert_allclose(ours - ours[:, :, -1:],
                             np.broadcast_to(want - want[:, :, -1:], ours.shape), atol=1e-6)


def test_logits_match_transformers_with_padding(saved):
  model, path = saved
  module, params = convert.import_hf(path, log=lambda _: None)
  assert (module.position, module.alibi_bias_max, module.tie_embeddings) == ("alibi", 8.0, True)
  with torch.no_grad():
    want = model(torch.from_numpy(TOKENS), attention_mask=torch.from_numpy(MASK.astype(int)),
                 output_hidden_states=True)

  def run(m, tokens, mask):
    hidden = m.trunk(m.embed(tokens), token_mask=mask)
    return hidden, m.logits(hidden)
  hidden, logits = jax.jit(nn.apply(run, module))({"params": params}, TOKENS,
                                                  MASK.astype(np.float32))
  diff = np.abs(np.asarray(logits)[MASK] - want.logits.numpy()[MASK]).max()
  print(f"MPT logits max abs diff vs transformers: {diff:.2e}")
  np.testing.assert_allclose(np.asarray(hidden)[MASK], want.hidden_states[-1].numpy()[MASK],
                             atol=1e-4, rtol=0)
  assert diff < 1e-4


def test_round_trip_reloads_identical_tensors(saved, tmp_path):
  model, path = saved
  module, params = convert.import_hf(path, log=lambda _: None)
  convert.export_hf(params, module, str(tmp_path))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
  assert type(reloaded) is transformers.MptForCausalLM
  assert reloaded.config.attn_config.alibi_bias_max == 8
  want, got = model.state_dict(), reloaded.state_dict()
  assert sorted(want) == sorted(got)
  for name in want:
    assert torch.equal(want[name], got[name]), name


def test_decoding_after_a_padded_prompt_sees_true_distances(saved):
  """Prompt [a, b, PAD, PAD] then c at position 2 (slot 4): the same logits for c as the
  unpadded [a, b, c], because the cache keeps its keys' positions for ALiBi."""
  _, path = saved
  module, params = convert.import_hf(path, log=lambda _: None)
  full = jax.jit(module.apply)({"params": params}, jnp.array([[3, 5, 7]]))[0, -1]
  shapes = jax.eval_shape(lambda: module.apply(
      {"params": params}, jnp.zeros((1, 5), jnp.int32), decode=True, mutable=["cache"])[1])
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)["cache"]
  step = jax.jit(lambda cache, tokens, positions, keys: module.apply(
      {"params": params, "cache": cache}, tokens, attention_mask=keys[:, None, None, :],
      positions=positions, decode=True, mutable=["cache"]))
  keys = jnp.array([[1, 1, 0, 0, 1]], bool)
  _, mutated = step(cache, jnp.array([[3, 5, 0, 0]]), jnp.arange(4)[None], keys)
  logits, _ = step(mutated["cache"], jnp.array([[7]]), jnp.array([[2]]), keys)
  np.testing.assert_allclose(np.asarray(logits)[0, -1], np.asarray(full), atol=1e-5)


def test_unsupported_mpt_options_are_refused():
  config = dict(model_type="mpt", d_model=8, n_heads=2, n_layers=1, vocab_size=8,
                attn_config={"qk_ln": True, "clip_qkv": 6.0})
  with pytest.raises(convert.ConversionError,
                     match=r"sets \['attn_config.qk_ln', 'attn_config.clip_qkv'\]"):
    convert.mpt.build(config)
