"""GPT-NeoX (RedPajama-INCITE layout, OpenFlamingo-4B's LM) import/export against
transformers (random small model, no download), padding included."""

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers

from vlm_jax import convert

TOKENS = np.array([[3, 5, 7, 9, 11, 2, 0, 0], [0, 0, 4, 6, 8, 10, 12, 14]])
MASK = (np.arange(8)[None] < [[6], [8]]) & (np.arange(8)[None] >= [[0], [2]])


def hf_neox(parallel: bool, seed=0):
  config = transformers.GPTNeoXConfig(
      vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, rotary_pct=1.0, rotary_emb_base=1000, layer_norm_eps=1e-5,
      use_parallel_residual=parallel, tie_word_embeddings=False)
  torch.manual_seed(seed)
  model = transformers.GPTNeoXForCausalLM(config)
  with torch.no_grad():  # norms at 1 and biases at 0 would hide mapping mistakes
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


@pytest.fixture(scope="module", params=[True, False], ids=["parallel", "sequential"])
def saved(request, tmp_path_factory):
  model = hf_neox(request.param)
  path = tmp_path_factory.mktemp("neox")
  model.save_pretrained(path, safe_serialization=True)
  return model, str(path)


def test_hidden_states_and_logits_match_transformers_with_padding(saved):
  model, path = saved
  module, params = convert.import_hf(path, log=lambda _: None)
  assert module.parallel_residual == model.config.use_parallel_residual
  with torch.no_grad():
    out = model(torch.from_numpy(TOKENS), attention_mask=torch.from_numpy(MASK.astype(int)),
                output_hidden_states=True)

  def run(m, tokens, mask):
    hidden = m.trunk(m.embed(tokens), token_mask=mask)
    return hidden, m.logits(hidden)
  hidden, logits = jax.jit(nn.apply(run, module))({"params": params}, TOKENS,
                                                  MASK.astype(np.float32))
  np.testing.assert_allclose(np.asarray(hidden)[MASK], out.hidden_states[-1].numpy()[MASK],
                             atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(logits)[MASK], out.logits.numpy()[MASK], atol=1e-4,
                             rtol=0)


def test_round_trip_reloads_identical_tensors(saved, tmp_path):
  model, path = saved
  module, params = convert.import_hf(path, log=lambda _: None)
  convert.export_hf(params, module, str(tmp_path))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
  assert type(reloaded) is transformers.GPTNeoXForCausalLM
  assert reloaded.config.use_parallel_residual == model.config.use_parallel_residual
  want, got = model.state_dict(), reloaded.state_dict()
  assert sorted(want) == sorted(got)
  for name in want:
    assert torch.equal(want[name], got[name]), name


def test_partial_rotary_is_refused(tmp_path):
  config = dict(model_type="gpt_neox", vocab_size=8, hidden_size=8, intermediate_size=8,
                num_hidden_layers=1, num_attention_heads=2, rotary_pct=0.25)
  with pytest.raises(convert.ConversionError, match=r"partial rotary \(rotary_pct=0.25\)"):
    convert.gpt_neox.build(config)
