"""RoBERTa into Prismer's decoder against transformers' RobertaForCausalLM (random, no
download): Prismer's new parts (cross-attention, adaptors, the extra output layer) are
bypassed with flax method interceptors, so the imported frozen path must equal HF exactly;
round trip through export; the new parts keep their initialisation.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers

import builders
from vlm_jax import convert
from vlm_jax.models import prismer
from vlm_jax.train import init_weights

DIMS = dict(lm=dict(vocab_size=60, width=32, num_layers=2, num_heads=4, mlp_dim=64,
                    max_text_length=20),
            vision=dict(width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=8, image_size=16),
            freeze="freeze_lang_vision", adaptor_ratio=1, dropout_rate=0.0)
PAD = 1  # RoBERTa's padding_idx
TOKENS = np.array([[0, 5, 7, 9, 11, 2, PAD, PAD], [0, 4, 6, 8, 10, 12, 14, 2]])
MASK = TOKENS != PAD


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  config = transformers.RobertaConfig(
      vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=20, type_vocab_size=1,
      layer_norm_eps=1e-5, is_decoder=True, pad_token_id=PAD)
  torch.manual_seed(0)
  model = transformers.RobertaForCausalLM(config)
  with torch.no_grad():  # norms at 1 and biases at 0 would hide mapping mistakes
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("roberta")
  model.save_pretrained(path, safe_serialization=True)
  return model.eval(), str(path)


def prismer_target(model):
  batch = prismer.batch_spec(ml_collections.ConfigDict(
      {"image_size": 16, "text_length": 8, "expert_size": 16, "experts": (), "label_dim": 4}), 1)
  batch = {k: jnp.zeros(s.shape, s.dtype) for k, s in batch.items()}
  shapes = jax.eval_shape(model.init, jax.random.key(0), batch)
  return batch, convert.flatten(nn.meta.unbox(shapes["params"]))


def bypass_new_parts(next_fun, args, kwargs, context):
  """Prismer's layer without its new parts is a RoBERTa layer: zero cross-attention output,
  identity for its norm, the adaptor and the extra output layer."""
  name = context.module.name
  if context.method_name == "__call__" and name in ("cross_attention_norm", "adaptor",
                                                      "output_layer"):
    return args[0]
  if context.method_name == "__call__" and name == "cross_attention":
    return jnp.zeros_like(args[0])
  return next_fun(*args, **kwargs)


@pytest.mark.parametrize("scan", [True, False])
def test_decoder_matches_transformers_with_padding(saved, scan):
  hf, path = saved
  model = builders.build("prismer", **DIMS, scan_layers=scan)
  batch, target = prismer_target(model)
  root, sub, new = init_weights.part_target(prismer.Prismer.PRETRAINED_PARTS["lm"], target)
  assert root == "" and not any(p.startswith("vision/") for p in sub)
  loaded = convert.load_part(path, sub, new=new, log=lambda _: None)
  assert all("cross_attention" not in p and "adaptor" not in p for p in loaded)
  fresh = convert.flatten(nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"]))
  params = convert.unflatten({**fresh, **loaded})
  encoded = jnp.zeros((2, 4, 16))
  with nn.intercept_methods(bypass_new_parts):
    logits = model.apply({"params": params}, encoded, None, jnp.asarray(TOKENS),
                         jnp.asarray(MASK, jnp.float32), method="decode")
  with torch.no_grad():
    want = hf(torch.from_numpy(TOKENS), attention_mask=torch.from_numpy(MASK.astype(int))).logits
  np.testing.assert_allclose(np.asarray(logits)[MASK], want.numpy()[MASK], atol=1e-4, rtol=0)
  # Without the bypass the new (random) parts change the output: they were not overwritten.
  plain = model.apply({"params": params}, encoded, None, jnp.asarray(TOKENS),
                      jnp.asarray(MASK, jnp.float32), method="decode")
  assert np.abs(np.asarray(plain) - np.asarray(logits)).max() > 1e-2


def test_round_trip_reloads_identical_tensors(saved, tmp_path):
  hf, path = saved
  model = builders.build("prismer", **DIMS)
  _, target = prismer_target(model)
  _, sub, new = init_weights.part_target(prismer.Prismer.PRETRAINED_PARTS["lm"], target)
  loaded = convert.load_part(path, sub, new=new, log=lambda _: None)
  convert.export_hf(convert.unflatten(loaded), model, str(tmp_path), arch="roberta")
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
  assert type(reloaded) is transformers.RobertaForCausalLM and reloaded.config.is_decoder
  want, got = hf.state_dict(), reloaded.state_dict()
  assert sorted(want) == sorted(got)
  for name in want:
    assert torch.equal(want[name], got[name]), name


def test_standalone_import_is_refused_with_a_pointer(saved):
  with pytest.raises(convert.ConversionError, match="import into a family's part only"):
    convert.import_hf(saved[1])
