"""MiniGPT-v2's released layout: the LM + LoRA path against transformers + peft (random tiny
LLaMA-2, PEFT LoRA on q_proj/v_proj as MiniGPT-v2's `init_llm`), the checkpoint MiniGPT-4's
runner writes (`{"model": trainable state dict, ...}`, PEFT names under `llama_model.`), an
EVA ViT-g file with LAVIS's key names (every key consumed once), and the export."""
import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from vlm_jax.convert import minigpt_v2, released

VISION, EVA_LAYERS, PATCH, SIZE = 16, 3, 4, 16  # EVA file: 3 blocks, the model uses 2
OVERRIDES = {"lm.lora_alpha": 8.0, "vision.num_heads": 2}  # not in the files
TOKENS = np.array([[1, 5, 9, 20, 31, 7, 0, 0], [0, 0, 0, 3, 4, 5, 6, 8],
                   [11, 12, 13, 14, 15, 16, 17, 18]])
MASK = (np.arange(8)[None] < [[6], [8], [8]]) & (np.arange(8)[None] >= [[0], [3], [0]])


class _MiniGPT(torch.nn.Module):
  """The parameter names of MiniGPT-v2's trainable part: llama_model (PEFT) + llama_proj."""

  def __init__(self, llama_model, proj_in, width):
    super().__init__()
    self.llama_model = llama_model
    self.llama_proj = torch.nn.Linear(proj_in, width)


def _eva(layers: int) -> dict:
  """A random EVA ViT-g state dict in LAVIS's key names (eva_vit.py, qkv_bias=True)."""
  g = torch.Generator().manual_seed(3)
  r = lambda *s: torch.randn(*s, generator=g) * 0.2
  d, mlp, grid = VISION, 4 * VISION, SIZE // PATCH
  state = {"cls_token": r(1, 1, d), "pos_embed": r(1, 1 + grid * grid, d),
           "patch_embed.proj.weight": r(d, 3, PATCH, PATCH), "patch_embed.proj.bias": r(d)}
  for i in range(layers):
    b = f"blocks.{i}."
    state.update({b + "norm1.weight": 1 + r(d), b + "norm1.bias": r(d),
                  b + "attn.q_bias": r(d), b + "attn.v_bias": r(d),
                  b + "attn.qkv.weight": r(3 * d, d), b + "attn.proj.weight": r(d, d),
                  b + "attn.proj.bias": r(d), b + "norm2.weight": 1 + r(d),
                  b + "norm2.bias": r(d), b + "mlp.fc1.weight": r(mlp, d),
                  b + "mlp.fc1.bias": r(mlp), b + "mlp.fc2.weight": r(d, mlp),
                  b + "mlp.fc2.bias": r(d)})
  return state


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  root = tmp_path_factory.mktemp("minigpt_v2")
  torch.manual_seed(0)
  llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, rms_norm_eps=1e-5, tie_word_embeddings=False))
  with torch.no_grad():
    for p in llama.parameters():
      p.add_(0.1 * torch.randn_like(p))
  llama.eval().save_pretrained(root / "lm", safe_serialization=True)
  lora = peft.get_peft_model(llama, peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.05,
      bias="none", task_type="CAUSAL_LM"))
  wrapper = _MiniGPT(lora, 4 * VISION, 32)
  with torch.no_grad():  # a trained-looking LoRA (PEFT starts lora_B at zero)
    for name, p in wrapper.named_parameters():
      if "lora_" in name:
        p.copy_(0.3 * torch.randn_like(p))
  wrapper.eval()
  trainable = {n for n, p in wrapper.named_parameters() if p.requires_grad}
  frozen = {n for n, _ in wrapper.named_parameters()} - trainable
  state = {k: v for k, v in wrapper.state_dict().items() if k not in frozen}  # the runner
  torch.save({"model": state, "epoch": 3, "config": {"lora_r": 4}}, root / "checkpoint.pth")
  eva = _eva(EVA_LAYERS)
  torch.save(eva, root / "eva_vit_g.pth")
  paths = {"checkpoint": str(root / "checkpoint.pth"), "lm": str(root / "lm"),
           "vision": str(root / "eva_vit_g.pth")}
  return lora, paths, {k: v.numpy() for k, v in state.items()}, eva


@pytest.fixture(scope="module")
def imported(release):
  _, paths, _, _ = release
  return released.import_released(minigpt_v2, paths, OVERRIDES, log=lambda _: None)


def test_lm_with_lora_matches_transformers_and_peft(release, imported):
  reference, _, state, _ = release
  model, params = imported
  assert (model.lm.lora_targets, model.lm.lora_rank, model.vision.depth) == (
      ("query", "value"), 4, 2)
  assert any(".lora_A.default." in k for k in state)  # PEFT >= 0.3 names
  with torch.no_grad():
    want = reference(input_ids=torch.from_numpy(TOKENS),
                     attention_mask=torch.from_numpy(MASK.astype(np.int64))).logits.numpy()
  got = np.asarray(jax.jit(lambda p, t, m: model.apply(
      {"params": p}, t, m, method=lambda mod, t, m: mod.lm(t, token_mask=m)))(
          params, TOKENS, MASK.astype(np.float32)))
  diff = np.abs(got[MASK] - want[MASK]).max()
  print(f"MiniGPT-v2 LM+LoRA logits max abs diff vs transformers+peft: {diff:.2e}")
  assert diff < 1e-4
  no_lora = jax.tree_util.tree_map_with_path(
      lambda path, x: x * 0 if "lora_b" in jax.tree_util.keystr(path) else x, params)
  base = np.asarray(model.apply({"params": no_lora}, TOKENS, MASK.astype(np.float32),
                                method=lambda mod, t, m: mod.lm(t, token_mask=m)))
  assert np.abs(base[MASK] - got[MASK]).max() > 1e-2  # the LoRA weights are in use


def test_every_published_tensor_is_consumed_once(release):
  _, paths, _, _ = release
  checkpoint = released.open_sources(minigpt_v2, paths)
  model, batch = released.build(minigpt_v2, checkpoint, OVERRIDES)
  used = released.consumers(minigpt_v2, checkpoint, model, released.target_of(model, batch))
  assert all(len(targets) == 1 for targets in used.values())
  last = f"vision:blocks.{EVA_LAYERS - 1}."
  assert set(used) == {n for n in checkpoint.tensors if not n.startswith(last)}
  assert used["checkpoint:llama_proj.weight"] == [("projection/kernel",)]
  assert used["vision:blocks.0.attn.q_bias"] == [tuple(
      f"vision/encoder/layers/self_attention/{n}/bias" for n in ("query", "key", "value"))]


def test_projection_and_vision_tower_values(release, imported):
  _, _, state, eva = release
  _, params = imported
  np.testing.assert_array_equal(np.asarray(params["projection"]["kernel"]),
                                state["llama_proj.weight"].T)
  attention = params["vision"]["encoder"]["layers"]["self_attention"]
  np.testing.assert_array_equal(np.asarray(attention["key"]["bias"]), 0)
  np.testing.assert_array_equal(np.asarray(attention["value"]["bias"][1]).reshape(-1),
                                eva["blocks.1.attn.v_bias"].numpy())
  norm = params["vision"]["encoder_norm"]  # ln_vision at its initialisation
  assert np.all(np.asarray(norm["scale"]) == 1) and np.all(np.asarray(norm["bias"]) == 0)


def test_export_reproduces_the_released_files(release, imported, tmp_path):
  _, paths, state, eva = release
  model, params = imported
  released.export_released(minigpt_v2, params, model, str(tmp_path))
  checkpoint = load_file(tmp_path / "checkpoint" / "model.safetensors")
  assert sorted(checkpoint) == sorted(state)
  for name, value in checkpoint.items():
    np.testing.assert_array_equal(value, state[name], err_msg=name)
  vision = load_file(tmp_path / "vision" / "model.safetensors")
  kept = {k: v for k, v in eva.items() if not k.startswith(f"blocks.{EVA_LAYERS - 1}.")}
  assert sorted(vision) == sorted(kept)
  for name, value in vision.items():
    np.testing.assert_array_equal(value, kept[name].numpy(), err_msg=name)
  original = load_file(paths["lm"] + "/model.safetensors")
  exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lm").state_dict()
  for name, value in original.items():
    np.testing.assert_array_equal(exported[name].numpy(), value, err_msg=name)


def test_peft_before_0_3_names_are_read(release, imported, tmp_path):
  _, paths, state, _ = release
  old = {k.replace(".default.", "."): torch.from_numpy(v) for k, v in state.items()}
  torch.save({"model": old}, tmp_path / "old.pth")
  _, params = released.import_released(
      minigpt_v2, dict(paths, checkpoint=str(tmp_path / "old.pth")), OVERRIDES,
      log=lambda _: None)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(imported[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_command_line_import(release, imported, tmp_path, capsys):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from vlm_jax.cli import convert as cli  # pylint: disable=g-import-not-at-top
  _, paths, _, _ = release
  cli.main(["import", paths["checkpoint"], "--layout", "minigpt_v2", "--lm", paths["lm"],
            "--vision", paths["vision"], "--set", "lm.lora_alpha=8.0", "--set", "vision.num_heads=2",
            "--out", str(tmp_path / "params")])
  assert "Imported" in capsys.readouterr().out
  with ocp.StandardCheckpointer() as reader:
    params = reader.restore(tmp_path / "params")
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(imported[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
