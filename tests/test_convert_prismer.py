"""Prismer's released layout (`pytorch_model.bin` of huggingface.co/shikunl/prismer): a state
dict with every key and shape the reference model (github.com/NVlabs/prismer, model/) has,
at a tiny size, is consumed key by key, reproduced exactly by the export, and a checkpoint
with experts is refused with the reason (BatchNorm stems)."""
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from vlm_jax.convert import prismer, released

TEXT, VISION, LAYERS, VOCAB, POSITIONS, PATCH, SIZE = 32, 32, 2, 50, 20, 8, 32
HEADS = {"lm.num_heads": 4, "vision.num_heads": 4}  # width / 64 would give 0 here


def _reference_state(experts: dict[str, int], text=TEXT, vision=VISION, layers=LAYERS,
                     vocab=VOCAB, positions=POSITIONS, patch=PATCH, size=SIZE) -> dict:
  """Names and shapes as PrismerCaption.state_dict(): expert_encoder (model/modules/vit.py,
  resampler.py, utils.Adaptor) and text_decoder (model/modules/roberta.py)."""
  g = torch.Generator().manual_seed(1)
  state = {}

  def add(name, *shape):
    state[name] = torch.randn(*shape, generator=g) * 0.2

  def linear(name, out, inp):
    add(name + ".weight", out, inp)
    add(name + ".bias", out)

  def norm(name, width):
    linear(name, width, 1)
    state[name + ".weight"] = state[name + ".weight"][:, 0] + 1

  v, t = "expert_encoder.", "text_decoder."
  add(v + "conv1.rgb.weight", vision, 3, patch, patch)
  for expert, channels in experts.items():
    widths = (channels, vision // 8, vision // 4, vision // 2, vision)
    for k, index in enumerate((1, 4, 7, 10)):
      add(f"{v}conv1.{expert}.{index}.weight", widths[k + 1], widths[k], 3, 3)
      bn = f"{v}conv1.{expert}.{index + 1}."
      norm(bn[:-1], widths[k + 1])
      state[bn + "running_mean"] = torch.zeros(widths[k + 1])
      state[bn + "running_var"] = torch.ones(widths[k + 1])
      state[bn + "num_batches_tracked"] = torch.tensor(7)
    add(f"{v}conv1.{expert}.13.weight", vision, vision, 1, 1)
  add(v + "positional_embedding", (size // patch) ** 2, vision)
  if experts:
    add(v + "instance_embedding", 128, vision)
    add(v + "resampler.latents", 8, vision)
    for j in range(2):
      b = f"{v}resampler.perceiver_blocks.{j}."
      linear(b + "attn.in_proj", 3 * vision, vision)
      state[b + "attn.in_proj_weight"] = state.pop(b + "attn.in_proj.weight")
      state[b + "attn.in_proj_bias"] = state.pop(b + "attn.in_proj.bias")
      linear(b + "attn.out_proj", vision, vision)
      linear(b + "mlp.c_fc", 4 * vision, vision)
      linear(b + "mlp.c_proj", vision, 4 * vision)
      for n in ("ln_1", "ln_2", "ln_ff"):
        norm(b + n, vision)
  for i in range(layers):
    b = f"{v}transformer.resblocks.{i}."
    add(b + "0.attn.in_proj_weight", 3 * vision, vision)
    add(b + "0.attn.in_proj_bias", 3 * vision)
    linear(b + "0.attn.out_proj", vision, vision)
    linear(b + "0.mlp.c_fc", 4 * vision, vision)
    linear(b + "0.mlp.c_proj", vision, 4 * vision)
    norm(b + "0.ln_1", vision)
    norm(b + "0.ln_2", vision)
    linear(b + "1.adaptor.down_proj", vision, vision)
    linear(b + "1.adaptor.up_proj", vision, vision)
    norm(b + "1.adaptor_ln", vision)
  norm(v + "ln_pre", vision)
  norm(v + "ln_post", vision)

  e = t + "roberta.embeddings."
  add(e + "word_embeddings.weight", vocab, text)
  add(e + "position_embeddings.weight", positions, text)
  add(e + "token_type_embeddings.weight", 1, text)
  norm(e + "LayerNorm", text)
  state[e + "position_ids"] = torch.arange(positions)[None]

  def roberta_attention(b, key_width):
    linear(b + "self.query", text, text)
    linear(b + "self.key", text, key_width)
    linear(b + "self.value", text, key_width)
    linear(b + "output.dense", text, text)
    norm(b + "output.LayerNorm", text)

  def roberta_layer(b):
    roberta_attention(b + "attention.", text)
    linear(b + "intermediate.dense", 4 * text, text)
    linear(b + "output.dense", text, 4 * text)
    norm(b + "output.LayerNorm", text)

  for i in range(layers):
    b = f"{t}roberta.encoder.layer.{i}."
    roberta_layer(b + "0.")
    roberta_attention(b + "1.", vision)  # cross-attention: keys from the vision width
    linear(b + "2.adaptor.down_proj", text, text)
    linear(b + "2.adaptor.up_proj", text, text)
    norm(b + "2.adaptor_ln", text)
  roberta_layer(t + "roberta.encoder.output_layer.")
  linear(t + "lm_head.dense", text, text)
  norm(t + "lm_head.layer_norm", text)
  add(t + "lm_head.bias", vocab)
  state[t + "lm_head.decoder.weight"] = state[e + "word_embeddings.weight"]
  state[t + "lm_head.decoder.bias"] = state[t + "lm_head.bias"]
  return state


@pytest.fixture(scope="module")
def prismerz(tmp_path_factory):
  state = _reference_state({})
  path = tmp_path_factory.mktemp("prismerz") / "pytorch_model.bin"
  torch.save(state, path)
  return {k: v.numpy() for k, v in state.items()}, str(path)


def test_every_key_is_consumed_once(prismerz):
  state, path = prismerz
  checkpoint = released.open_sources(prismer, {"checkpoint": path})
  model, batch = released.build(prismer, checkpoint, HEADS)
  assert (model.lm.num_layers, model.vision.depth, model.vision.image_size,
          model.vision.experts) == (LAYERS, LAYERS, SIZE, ())
  used = released.consumers(prismer, checkpoint, model, released.target_of(model, batch))
  assert all(len(targets) == 1 for targets in used.values())
  duplicates = {"text_decoder.lm_head.decoder.weight", "text_decoder.lm_head.decoder.bias",
                "text_decoder.roberta.embeddings.position_ids"}
  assert {n.removeprefix("checkpoint:") for n in used} == set(state) - duplicates
  assert used["checkpoint:text_decoder.roberta.encoder.layer.1.1.self.key.weight"] == [
      ("decoder/layers/cross_attention/key/kernel",)]


def test_values_land_and_the_export_reproduces_the_file(prismerz, tmp_path):
  state, path = prismerz
  model, params = released.import_released(prismer, {"checkpoint": path}, HEADS,
                                           log=lambda _: None)
  np.testing.assert_array_equal(
      np.asarray(params["vision"]["embedder"]["pos_embedding"]["pos_embedding"]),
      state["expert_encoder.positional_embedding"].reshape(4, 4, VISION))
  np.testing.assert_array_equal(
      np.asarray(params["decoder"]["layers"]["adaptor"]["down"]["kernel"][1]),
      state["text_decoder.roberta.encoder.layer.1.2.adaptor.down_proj.weight"].T)
  released.export_released(prismer, params, model, str(tmp_path))
  exported = load_file(tmp_path / "checkpoint" / "model.safetensors")
  assert sorted(exported) == sorted(state)
  for name, value in exported.items():
    np.testing.assert_array_equal(value, state[name], err_msg=name)
    assert value.dtype == state[name].dtype, name


def test_checkpoints_with_batchnorm_expert_stems_are_refused(tmp_path):
  torch.save(_reference_state({"depth": 1, "seg": 64}), tmp_path / "pytorch_model.bin")
  checkpoint = released.open_sources(prismer, {"checkpoint": str(tmp_path / "pytorch_model.bin")})
  model, _ = released.build(prismer, checkpoint, dict(HEADS, **{"vision.resampler_heads": 4}))
  assert model.vision.experts == ("depth", "seg")
  with pytest.raises(released.ConversionError,
                     match=r"expert stems normalise with BatchNorm \(checkpoint:expert_encoder\."
                           r"conv1\.depth\.11\.running_mean, \.\.\. 8 in all\), ours with "
                           r"LayerNorm"):
    prismer.layout(model, checkpoint)


def test_command_line_import(prismerz, tmp_path, capsys):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from vlm_jax.cli import convert as cli  # pylint: disable=g-import-not-at-top
  state, path = prismerz
  cli.main(["import", path, "--layout", "prismer", "--set", "lm.num_heads=4", "--set",
            "vision.num_heads=4", "--out", str(tmp_path / "params")])
  assert "Imported" in capsys.readouterr().out
  with ocp.StandardCheckpointer() as reader:
    params = reader.restore(tmp_path / "params")
  np.testing.assert_array_equal(params["word_embedding"],
                                state["text_decoder.roberta.embeddings.word_embeddings.weight"])
