"""vlm-convert inspect / import / export on a family config (MiniGPT-v2 tiny, LLaMA LM)."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers

from vlm_jax import config as config_lib
from vlm_jax.cli import convert as cli
from vlm_jax.models import registry
from vlm_jax import params as state_lib

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "minigpt_v2.py") + ":tiny"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
  """An HF LLaMA shaped like configs/minigpt_v2.py:tiny's LM."""
  config = transformers.LlamaConfig(
      vocab_size=1024, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
      num_attention_heads=4, rms_norm_eps=1e-5, tie_word_embeddings=False)
  torch.manual_seed(1)
  model = transformers.LlamaForCausalLM(config).eval()
  path = tmp_path_factory.mktemp("llama")
  model.save_pretrained(path, safe_serialization=True)
  return model, str(path)


def test_inspect_reports_architecture_and_counts(tiny_llama, capsys):
  model, path = tiny_llama
  cli.main(["inspect", path])
  info = json.loads(capsys.readouterr().out)
  assert info["arch"] == "llama" and info["tensors"] == 21
  assert info["parameters"] == sum(p.numel() for p in model.parameters())
  assert info["dtypes"] == {"float32": 21}


def test_import_into_family_part_and_save(tiny_llama, tmp_path, capsys):
  model, path = tiny_llama
  cli.main(["import", path, "--config", CONFIG, "--part", "lm", "--out", str(tmp_path / "p")])
  assert "keep their initialisation" in capsys.readouterr().out  # LoRA params
  with ocp.StandardCheckpointer() as reader:
    params = reader.restore(tmp_path / "p")
  np.testing.assert_array_equal(params["embed"]["embedding"],
                                model.model.embed_tokens.weight.detach().numpy())
  assert "lora_a" not in params["layers"]["layers"]["self_attention"]["query"]


def test_bad_part_exits_with_a_message(tiny_llama, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["import", tiny_llama[1], "--config", CONFIG, "--part", "text"])
  assert e.value.code == 2
  assert "--part text: MiniGPTv2 declares ['lm', 'vision'] parts" in capsys.readouterr().err


def test_export_of_a_run_merges_lora_and_transformers_reproduces_the_lm(tmp_path):
  config = config_lib.load_config(CONFIG)
  model = registry.build(config.model)
  batch = registry.dummy_batch(config, 1)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch))["params"]
  flat = state_lib.flatten(params)
  rng = np.random.default_rng(0)
  for path in flat:  # a trained-looking LoRA
    if path.endswith("lora_b"):
      flat[path] = jnp.asarray(0.05 * rng.standard_normal(flat[path].shape), jnp.float32)
  params = state_lib.unflatten(flat)
  trainable, frozen = state_lib.split_frozen(params, config.frozen)
  workdir = tmp_path / "run"
  with ocp.CheckpointManager(workdir / "checkpoints", item_names=("state",)) as manager:
    manager.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(
        {"step": jnp.array(7), "params": trainable, "frozen": frozen})))
  out = tmp_path / "hf"
  cli.main(["export", "--config", CONFIG, "--workdir", str(workdir), "--out", str(out)])
  hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  tokens = np.array([[5, 9, 200, 31, 7, 0, 0, 0], [3, 4, 5, 6, 7, 8, 9, 10]])
  mask = (np.arange(8)[None] < [[5], [8]])
  with torch.no_grad():
    want = hf(torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask.astype(int))).logits
  ours = model.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(mask, jnp.float32),
                     method=lambda m, t, k: m.lm(t, token_mask=k))
  np.testing.assert_allclose(np.asarray(ours)[mask], want.numpy()[mask], atol=1e-4, rtol=0)
