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


# ----------------------------------------------------------------------------------------
# A released layout (MiniGPT-v2's) into the tiny config's model, sharded, from the CLI
# ----------------------------------------------------------------------------------------
def _eva(width, layers, patch, size):
  g = torch.Generator().manual_seed(2)
  r = lambda *s: 0.1 * torch.randn(*s, generator=g)
  state = {"cls_token": r(1, 1, width), "pos_embed": r(1, 1 + (size // patch) ** 2, width),
           "patch_embed.proj.weight": r(width, 3, patch, patch),
           "patch_embed.proj.bias": r(width)}
  for i in range(layers):
    b = f"blocks.{i}."
    for name, shape in (("norm1", (width,)), ("norm2", (width,)),
                        ("attn.proj", (width, width)), ("mlp.fc1", (4 * width, width)),
                        ("mlp.fc2", (width, 4 * width))):
      state[b + name + ".weight"], state[b + name + ".bias"] = r(*shape), r(shape[0])
    state[b + "attn.qkv.weight"] = r(3 * width, width)
    state[b + "attn.q_bias"], state[b + "attn.v_bias"] = r(width), r(width)
  return state


def _minigpt_release(tiny_llama, directory):
  """(checkpoint .pth, EVA .pth, state) of a MiniGPT-v2 release shaped like CONFIG's model."""
  import peft  # pylint: disable=g-import-not-at-top  (test extra)
  config = config_lib.load_config(CONFIG)
  lora = peft.get_peft_model(transformers.LlamaForCausalLM(tiny_llama[0].config),
                             peft.LoraConfig(r=config.model.lm.lora_rank, lora_alpha=16,
                                             target_modules=["q_proj", "v_proj"]))
  vision, lm_width = config.model.vision.width, config.model.lm.width
  state = {"llama_model." + k: v for k, v in lora.state_dict().items() if "lora_" in k}
  state["llama_proj.weight"] = torch.randn(lm_width, 4 * vision)
  state["llama_proj.bias"] = torch.randn(lm_width)
  torch.save({"model": state}, directory / "minigptv2_checkpoint.pth")
  torch.save(_eva(vision, config.model.vision.depth + 1, 14, config.data.image_size),
             directory / "eva_vit_g.pth")
  return str(directory / "minigptv2_checkpoint.pth"), str(directory / "eva_vit_g.pth"), state


def test_import_of_a_released_layout_into_the_configs_sharded_model(tiny_llama, tmp_path,
                                                                     capsys):
  model, lm_path = tiny_llama
  checkpoint, eva, state = _minigpt_release(tiny_llama, tmp_path)
  cli.main(["import", checkpoint, "--layout", "minigpt_v2", "--lm", lm_path, "--vision", eva,
            "--config", CONFIG, "--out", str(tmp_path / "params")])
  assert "Imported" in capsys.readouterr().out
  with ocp.StandardCheckpointer() as reader:
    params = reader.restore(tmp_path / "params")
  np.testing.assert_array_equal(params["projection"]["kernel"], state["llama_proj.weight"].T)
  lora_a = state["llama_model.base_model.model.model.layers.1.self_attn.v_proj.lora_A."
                 "default.weight"]
  np.testing.assert_array_equal(
      params["lm"]["layers"]["layers"]["self_attention"]["value"]["lora_a"][1], lora_a.T)
  np.testing.assert_array_equal(params["lm"]["embed"]["embedding"],
                                model.model.embed_tokens.weight.detach().numpy())


def test_a_released_layout_with_a_missing_file_exits_with_a_message(tiny_llama, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["import", tiny_llama[1], "--layout", "openflamingo", "--lm", tiny_llama[1]])
  assert e.value.code == 2
  assert "openflamingo: sources ['vision'] are missing" in capsys.readouterr().err


def test_export_of_a_run_in_a_released_layout_imports_back(tmp_path):
  from vlm_jax.convert import minigpt_v2, released  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(CONFIG)
  model = registry.build(config.model)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), registry.dummy_batch(config, 1)))
  params = params["params"]
  trainable, frozen = state_lib.split_frozen(params, config.frozen)
  workdir = tmp_path / "run"
  with ocp.CheckpointManager(workdir / "checkpoints", item_names=("state",)) as manager:
    manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(
        {"step": jnp.array(3), "params": trainable, "frozen": frozen})))
  out = tmp_path / "release"
  cli.main(["export", "--config", CONFIG, "--workdir", str(workdir), "--layout", "minigpt_v2",
            "--out", str(out)])
  assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "lm", "vision"]
  m = config.model
  _, again = released.import_released(
      minigpt_v2, {s: str(out / s) for s in minigpt_v2.SOURCES},
      {"lm.lora_alpha": m.lm.lora_alpha, "vision.num_heads": m.vision.num_heads,
       "vision.depth": m.vision.depth}, log=lambda _: None)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_release_imported_as_a_run_is_evaluated_by_two_processes(tiny_llama, tmp_path):
  """vlm-convert import --layout minigpt_v2 --workdir RUN, then `vlm-launch local
  --num-processes 2 --program eval` captions the COCO-format fixture with those weights."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  paths = _minigpt_release(tiny_llama, tmp_path)[:2]
  run = tmp_path / "run"
  cli.main(["import", paths[0], "--layout", "minigpt_v2", "--lm", tiny_llama[1], "--vision",
            paths[1], "--config", CONFIG, "--workdir", str(run), "--out", str(tmp_path / "p")])
  with pytest.raises(SystemExit):  # a second import would overwrite the run's step 0
    cli.main(["import", paths[0], "--layout", "minigpt_v2", "--lm", tiny_llama[1],
              "--vision", paths[1], "--config", CONFIG, "--workdir", str(run)])
  with ocp.StandardCheckpointer() as reader:
    imported = state_lib.flatten(reader.restore(tmp_path / "p"))
  saved, step = state_lib.read_checkpoint(str(run), {
      p: jax.ShapeDtypeStruct(a.shape, a.dtype) for p, a in imported.items()})
  assert step == 0 and sorted(saved) == sorted(imported)
  for p, a in imported.items():
    np.testing.assert_array_equal(np.asarray(saved[p]), a, err_msg=p)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  images = tmp_path / "images"  # the fixture's image 7 (image 9 is absent: skipped)
  images.mkdir()
  Image.fromarray(np.full((40, 56, 3), (200, 30, 30), np.uint8)).save(
      images / "COCO_val2014_000000000007.jpg")
  fixture = os.path.join(os.path.dirname(__file__), "data", "benchmarks", "coco_captions.json")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run(
      [sys.executable, "-m", "vlm_jax.cli.launch", "local", "--num-processes", "2",
       "--cpu-devices-per-process", "1", "--program", "eval", "--config", CONFIG,
       "--workdir", str(run), "--coco-captions", fixture, "--image-dir", str(images)],
      capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": repo})
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert done.stdout.count("coco_captions (step 0)") == 1, done.stdout[-3000:]
  with open(run / "metrics.jsonl") as f:
    written = [json.loads(line) for line in f]
  assert written[-1]["eval/coco_captions/images"] == 1
  assert written[-1]["eval/coco_captions/skipped"] == 1
  assert written[-1]["eval/coco_captions/cider"] >= 0
