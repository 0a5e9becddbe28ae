"""CLIP vision tower import/export against transformers' CLIPVisionModel (random, no
download), from a full CLIPModel checkpoint too, and into a sharded target."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from vlm_jax import convert

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8, layer_norm_eps=1e-5)


def randomised(model, seed=0):
  """HF initialises norms to 1 and biases to 0: perturb every param so each mapping counts."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


@pytest.fixture(scope="module")
def vision(tmp_path_factory):
  model = randomised(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)))
  path = tmp_path_factory.mktemp("clip_vision")
  model.save_pretrained(path, safe_serialization=True)
  return model, str(path)


def pixels(seed=0):
  return np.random.default_rng(seed).standard_normal((2, 3, 32, 32)).astype(np.float32)


def hf_tokens(model, x):
  """Every token after the final LayerNorm (HF applies it to the pooled token only)."""
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(x))
    return (model.post_layernorm(out.last_hidden_state).numpy(),
            out.pooler_output.numpy())


def ours(module, params, x):
  return np.asarray(jax.jit(module.apply)({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1))))


@pytest.mark.parametrize("scan", [True, False])
def test_tokens_match_transformers(vision, scan):
  model, path = vision
  module, params = convert.import_hf(path, scan_layers=scan, log=lambda _: None)
  assert (module.mlp_activation, module.norm_epsilon, module.pre_norm) == ("quick_gelu", 1e-5, True)
  x = pixels()
  want, pooled = hf_tokens(model, x)
  got = ours(module, params, x)
  assert got.shape == (2, 17, 32)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  np.testing.assert_allclose(got[:, 0], pooled, atol=1e-4, rtol=0)


def test_vision_half_of_a_full_clip_checkpoint(tmp_path):
  config = transformers.CLIPConfig(
      text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, vocab_size=50, bos_token_id=0, eos_token_id=1,
                       pad_token_id=1),
      vision_config=VISION, projection_dim=8)
  model = randomised(transformers.CLIPModel(config), seed=1)
  model.save_pretrained(tmp_path, safe_serialization=True)
  checkpoint = convert.Checkpoint(str(tmp_path))
  assert any(n.startswith("vision_model.") for n in checkpoint.tensors)
  assert any(n.startswith("text_model.") for n in checkpoint.tensors)
  module, params = convert.import_hf(str(tmp_path), log=lambda _: None)
  x = pixels(1)
  with torch.no_grad():
    tower = model.vision_model
    want = tower.post_layernorm(tower(pixel_values=torch.from_numpy(x)).last_hidden_state)
  np.testing.assert_allclose(ours(module, params, x), want.numpy(), atol=1e-4, rtol=0)


def test_round_trip_reloads_identical_tensors(vision, tmp_path):
  model, path = vision
  module, params = convert.import_hf(path, log=lambda _: None)
  convert.export_hf(params, module, str(tmp_path))
  reloaded = transformers.CLIPVisionModel.from_pretrained(tmp_path)
  assert reloaded.config.image_size == 32 and reloaded.config.hidden_act == "quick_gelu"
  want, got = model.state_dict(), reloaded.state_dict()
  assert sorted(want) == sorted(got)
  for name in want:
    assert torch.equal(want[name], got[name]), name


def test_sharded_import_places_each_array_in_its_sharding(vision):
  _, path = vision
  mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  P = jax.sharding.PartitionSpec
  module, _ = convert.clip.build(convert.Checkpoint(path).config())
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  flat = convert.flatten(nn.meta.unbox(shapes["params"]))
  specs = {"encoder/layers/self_attention/query/kernel": P(None, "fsdp", "tensor", None),
           "encoder/layers/mlp/wi/kernel": P(None, "fsdp", "tensor"),
           "pos_embedding/pos_embedding": P(None, "fsdp")}
  target = {p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=jax.sharding.NamedSharding(
      mesh, specs.get(p, P()))) for p, s in flat.items()}
  loaded = convert.load_part(path, target, log=lambda _: None)
  reference = convert.flatten(convert.import_hf(path, log=lambda _: None)[1])
  for p, array in loaded.items():
    assert array.sharding == target[p].sharding, p
    np.testing.assert_array_equal(np.asarray(array), np.asarray(reference[p]))
  q = loaded["encoder/layers/self_attention/query/kernel"]
  assert {s.data.shape for s in q.addressable_shards} == {(2, 8, 2, 8)}
