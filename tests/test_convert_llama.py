"""LLaMA import/export against transformers (random small model, no download), the trainer's
config.init.lm into an 8-device sharded state, and the loader's error cases."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import builders
from vlm_jax import convert
from vlm_jax import config as config_lib
from vlm_jax import sharding
from vlm_jax.convert import transfer
from vlm_jax.models import minigpt_v2
from vlm_jax.nn import decoder_lm
from vlm_jax.train import init_weights, optimizer
from vlm_jax.train import state as state_lib

DIMS = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
# Row 0 right-padded, row 1 left-padded, row 2 full.
TOKENS = np.array([[3, 5, 7, 9, 11, 2, 0, 0], [0, 0, 0, 4, 6, 8, 10, 12],
                   [13, 17, 19, 23, 29, 31, 37, 41]])
MASK = (np.arange(8)[None] < [[6], [8], [8]]) & (np.arange(8)[None] >= [[0], [3], [0]])


def hf_llama(seed=0, **overrides):
  config = transformers.LlamaConfig(**{**DIMS, "rms_norm_eps": 1e-5, "rope_theta": 500.0,
                                       "tie_word_embeddings": False, **overrides})
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():  # HF initialises norms to 1; randomise them so the mapping is tested
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """(HF model, single-file dir, sharded dir with an index json)."""
  model = hf_llama()
  single, sharded = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("sharded")
  model.save_pretrained(single, safe_serialization=True)
  model.save_pretrained(sharded, safe_serialization=True, max_shard_size="20KB")
  assert os.path.isfile(sharded / "model.safetensors.index.json")
  return model, str(single), str(sharded)


def hf_outputs(model, tokens=TOKENS, mask=MASK):
  with torch.no_grad():
    out = model(torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask.astype(np.int64)),
                output_hidden_states=True)
  return out.hidden_states[-1].numpy(), out.logits.numpy()


def ours(module, params, tokens=TOKENS, mask=MASK):
  def run(m, tokens, mask):
    hidden = m.trunk(m.embed(tokens), token_mask=mask)
    return hidden, m.logits(hidden)
  return jax.jit(nn.apply(run, module))({"params": params}, tokens, mask.astype(np.float32))


# Stack layouts: scanned, unscanned, and grouped 2 layers per unit (Flamingo's LM), both ways.
@pytest.mark.parametrize("layout,scan,group", [("single", True, 1), ("sharded", False, 1),
                                               ("single", True, 2), ("sharded", False, 2)])
def test_hidden_states_and_logits_match_transformers_with_padding(saved, layout, scan, group):
  model, single, sharded = saved
  module, params = convert.import_hf(single if layout == "single" else sharded,
                                     scan_layers=scan, layers_per_unit=group,
                                     log=lambda _: None)
  if group > 1:
    unit = params["layers"]["layers" if scan else "layers_0"]
    assert sorted(unit) == ["sublayer_0", "sublayer_1"]
  assert module.rotary_max_wavelength == 500.0 and module.num_kv_heads == 2
  hidden, logits = ours(module, params)
  want_hidden, want_logits = hf_outputs(model)
  np.testing.assert_allclose(np.asarray(hidden)[MASK], want_hidden[MASK], atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(logits)[MASK], want_logits[MASK], atol=1e-4, rtol=0)


def test_round_trip_reloads_identical_tensors(saved, tmp_path):
  model, single, _ = saved
  module, params = convert.import_hf(single, log=lambda _: None)
  convert.export_hf(params, module, str(tmp_path / "single"))
  convert.export_hf(params, module, str(tmp_path / "sharded"), max_shard_bytes=20_000)
  assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
  for out in ("single", "sharded"):
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / out)
    assert type(reloaded) is transformers.LlamaForCausalLM
    assert reloaded.config.rope_parameters["rope_theta"] == 500.0
    want, got = model.state_dict(), reloaded.state_dict()
    assert sorted(want) == sorted(got)
    for name in want:
      assert torch.equal(want[name], got[name]), name


def test_lora_model_exports_merged_and_transformers_reproduces_it(saved, tmp_path):
  _, single, _ = saved
  base, base_params = convert.import_hf(single, log=lambda _: None)
  lora_lm = base.clone(lora_targets=("query", "value"), lora_rank=4, lora_alpha=8.0)
  shapes = jax.eval_shape(lora_lm.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  flat = convert.flatten(nn.meta.unbox(shapes["params"]))
  base_flat = convert.flatten(base_params)
  rng = np.random.default_rng(0)
  params = convert.unflatten({  # trained-looking LoRA: both factors non-zero
      p: base_flat[p] if p in base_flat else 0.2 * rng.standard_normal(s.shape, np.float32)
      for p, s in flat.items()})
  convert.export_hf(params, lora_lm, str(tmp_path))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  _, want_logits = hf_outputs(reloaded)
  _, logits = ours(lora_lm, params)
  _, base_logits = ours(base, base_params)
  assert np.abs(np.asarray(logits) - np.asarray(base_logits))[MASK].max() > 1e-2
  np.testing.assert_allclose(np.asarray(logits)[MASK], want_logits[MASK], atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------
# config.init.lm into the train state of a family, sharded over 8 devices
# ----------------------------------------------------------------------------------------
def test_init_lm_lands_in_sharded_state_and_keeps_lora_and_vision_init(saved):
  model_hf, _, sharded_dir = saved
  config = config_lib.base_config()
  config.init.lm = sharded_dir
  config.frozen = minigpt_v2.frozen_patterns()
  config.mesh.shape = (2, 2, 2)
  model = builders.build(
      "minigpt_v2", lm=dict(vocab_size=64, width=32, num_layers=2, num_heads=4, num_kv_heads=2,
                            mlp_dim=48, rotary_max_wavelength=500.0,
                            lora_targets=("query", "value"), lora_rank=4),
      vision=dict(width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=14, class_token=True),
      group_size=4)
  batch = {"images": jnp.zeros((2, 1, 56, 56, 3)), "image_mask": jnp.ones((2, 1)),
           "tokens": jnp.zeros((2, 16), jnp.int32), "token_mask": jnp.ones((2, 16)),
           "image_positions": jnp.zeros((2, 1), jnp.int32)}
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    factory = state_lib.StateFactory(model, optimizer.make_optimizer(config), config, mesh,
                                     batch)
    fresh = factory.create(jax.random.key(0))
    before = {k: np.asarray(v) for k, v in convert.flatten(fresh.params).items()}
    vision_before = np.asarray(fresh.frozen["vision"]["cls"])
    logged = []
    state = init_weights.apply(config, model, factory, fresh, logged.append)
  assert "config.init.lm" in logged[0] and "keep their initialisation" in logged[0]
  frozen, trainable = convert.flatten(state.frozen), convert.flatten(state.params)
  want = factory.shardings
  for tree, shardings in ((state.frozen, want.frozen), (state.params, want.params)):
    for path, array in convert.flatten(tree).items():
      assert array.sharding == convert.flatten(shardings)[path], path
  q = frozen["lm/layers/layers/self_attention/query/kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  assert len(q.sharding.device_set) == 8
  hf = {k: v.numpy() for k, v in model_hf.state_dict().items()}
  np.testing.assert_array_equal(np.asarray(q)[1], hf["model.layers.1.self_attn.q_proj.weight"]
                                .T.reshape(32, 4, 8))
  np.testing.assert_array_equal(np.asarray(frozen["lm/embed/embedding"]),
                                hf["model.embed_tokens.weight"])
  for path, value in before.items():  # LoRA and the projection are new: untouched
    np.testing.assert_array_equal(np.asarray(trainable[path]), value)
  np.testing.assert_array_equal(np.asarray(state.frozen["vision"]["cls"]), vision_before)


def test_init_key_the_family_does_not_declare_is_an_error(saved):
  config = config_lib.base_config()
  config.init.vision = saved[1]
  with pytest.raises(convert.ConversionError, match=r"config.init.vision=.*declares no"):
    init_weights.apply(config, decoder_lm.DecoderLM(8, 8, 1, 1, 8), None, None)
  assert minigpt_v2.MiniGPTv2.PRETRAINED_PARTS["lm"] == {"path": "lm"}


# ----------------------------------------------------------------------------------------
# Errors: missing / unexpected / shape / dtype, pickle refused, unknown architecture
# ----------------------------------------------------------------------------------------
def target_of(module):
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  return convert.flatten(nn.meta.unbox(shapes["params"]))


def rewrite(saved_dir, out, edit):
  """A copy of a single-file checkpoint with its tensor dict passed through `edit`."""
  tensors = edit(load_file(os.path.join(saved_dir, "model.safetensors")))
  os.makedirs(out, exist_ok=True)
  save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(saved_dir, "config.json")) as f, \
       open(os.path.join(out, "config.json"), "w") as g:
    g.write(f.read())
  return str(out)


@pytest.fixture(scope="module")
def llama_target(saved):
  module, _ = convert.llama.build(json.load(open(os.path.join(saved[1], "config.json"))))
  return target_of(module)


def test_missing_tensor_is_named(saved, tmp_path, llama_target):
  path = rewrite(saved[1], tmp_path, lambda t: {k: v for k, v in t.items()
                                                if k != "model.layers.1.mlp.up_proj.weight"})
  with pytest.raises(convert.ConversionError) as e:
    convert.plan(path, llama_target)
  assert "tensors missing from" in str(e.value) and "model.safetensors" in str(e.value)
  assert "model.layers.1.mlp.up_proj.weight (for our layers/layers/mlp/wi_gate/kernel)" in str(e.value)


def test_unexpected_tensor_is_named(saved, tmp_path, llama_target):
  path = rewrite(saved[1], tmp_path, lambda t: {**t, "model.layers.0.extra.weight":
                                                torch.zeros(3, 2)})
  with pytest.raises(convert.ConversionError,
                     match=r"unexpected tensors.*\n  model.layers.0.extra.weight \(3, 2\) in "
                           r".*model.safetensors"):
    convert.plan(path, llama_target)


def test_shape_mismatch_names_tensor_both_shapes_and_file(saved, tmp_path, llama_target):
  path = rewrite(saved[1], tmp_path, lambda t: {
      **t, "model.layers.0.self_attn.k_proj.weight": torch.zeros(24, 32)})
  with pytest.raises(convert.ConversionError) as e:
    convert.plan(path, llama_target)
  file = os.path.join(path, "model.safetensors")
  assert (f"model.layers.0.self_attn.k_proj.weight: shape (24, 32) in {file}, but our "
          "layers/layers/self_attention/key/kernel (2, 32, 2, 8) needs (16, 32)") in str(e.value)


def test_our_parameters_without_a_source_are_an_error_unless_declared_new(saved, llama_target):
  target = {**llama_target, "adapter/kernel": jax.ShapeDtypeStruct((4, 4), jnp.float32)}
  with pytest.raises(convert.ConversionError, match=r"does not provide.*\n  adapter/kernel"):
    convert.plan(saved[1], target)
  assert convert.plan(saved[1], target, new=(r"adapter/.*",)).kept == ["adapter/kernel"]


def test_dtype_change_is_reported_and_converted(saved, tmp_path, llama_target):
  path = rewrite(saved[1], tmp_path, lambda t: {k: v.to(torch.bfloat16) for k, v in t.items()})
  logged = []
  loaded = convert.load_part(path, llama_target, log=logged.append)
  assert "21 tensor(s) converted from bfloat16 to float32" in logged[0]
  embed = loaded["embed/embedding"]
  assert embed.dtype == jnp.float32
  want = load_file(os.path.join(path, "model.safetensors"))["model.embed_tokens.weight"]
  np.testing.assert_array_equal(np.asarray(embed), want.float().numpy())


def test_pickle_checkpoints_and_unknown_architectures_are_refused(saved, tmp_path):
  torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
  with pytest.raises(convert.ConversionError, match="pickle checkpoints are not read"):
    convert.Checkpoint(str(tmp_path))
  path = rewrite(saved[1], tmp_path / "other", lambda t: t)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"model_type": "bloom"}, f)
  with pytest.raises(convert.ConversionError, match="model_type='bloom' is not one we import"):
    convert.import_hf(path)


def test_describe_lists_what_was_kept(saved, llama_target):
  lora_target = {**llama_target, "layers/layers/self_attention/query/lora_a":
                 jax.ShapeDtypeStruct((2, 32, 4), jnp.float32)}
  plan = convert.plan(saved[1], lora_target)
  assert plan.kept == ["layers/layers/self_attention/query/lora_a"]
  assert "1 new parameter array(s) keep their initialisation" in transfer.describe(plan)
