"""Prismer's released layout (`pytorch_model.bin` of huggingface.co/shikunl/prismer): a state
dict with every key and shape the reference model (github.com/NVlabs/prismer, model/) has,
at a tiny size, with and without experts, is consumed key by key and reproduced by the export;
an imported expert stem computes what the reference's torch stem computes."""
import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from vlm_jax.convert import prismer, released
from vlm_jax.nn import expert_stem, expert_vit

TEXT, VISION, LAYERS, VOCAB, POSITIONS, PATCH, SIZE = 32, 32, 2, 50, 20, 8, 32
HEADS = {"lm.num_heads": 4, "vision.num_heads": 4}  # width / 64 would give 0 here


def torch_stem(channels: int, width: int, patch: int, label: bool) -> torch.nn.Sequential:
  """VisionTransformer.conv1[expert] of model/modules/vit.py (lines 87-120 at NVlabs/prismer
  4f27ab3): label maps (seg, obj_detection, ocr_detection; 64 channels) resize by 4 / patch
  and stride 2, 2, 1, 1; dense maps by 16 / patch and stride 2, 2, 2, 2."""
  nn = torch.nn
  strides = (2, 2, 1, 1) if label else (2, 2, 2, 2)
  widths = (channels, width // 8, width // 4, width // 2, width)
  layers = [nn.UpsamplingBilinear2d(scale_factor=(4 if label else 16) / patch)]
  for k, stride in enumerate(strides):
    layers += [nn.Conv2d(widths[k], widths[k + 1], kernel_size=3, stride=stride, padding=1,
                         bias=False), nn.BatchNorm2d(widths[k + 1]), nn.ReLU()]
  return nn.Sequential(*layers, nn.Conv2d(width, width, kernel_size=1, stride=1, padding=0,
                                          bias=False))


def _randomised(stem: torch.nn.Sequential, generator) -> torch.nn.Sequential:
  """Random weights and non-trivial running statistics (as after training), eval mode."""
  with torch.no_grad():
    for layer in stem:
      if isinstance(layer, torch.nn.Conv2d):
        layer.weight.normal_(0, layer.weight[0].numel() ** -0.5, generator=generator)
      if isinstance(layer, torch.nn.BatchNorm2d):
        layer.weight.normal_(1, 0.2, generator=generator)
        layer.bias.normal_(0, 0.2, generator=generator)
        layer.running_mean.normal_(0, 0.5, generator=generator)
        layer.running_var.uniform_(0.3, 3, generator=generator)
        layer.num_batches_tracked.fill_(7)
  return stem.eval()


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
    stem = _randomised(torch_stem(channels, vision, patch, expert in expert_vit.LABEL_EXPERTS), g)
    state.update({f"{v}conv1.{expert}.{k}": x for k, x in stem.state_dict().items()})
  add(v + "positional_embedding", (size // patch) ** 2, vision)
  if "obj_detection" in experts:
    add(v + "instance_embedding", 128, vision)
  if experts:
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


EXPERTS = {"depth": 1, "seg": 64, "obj_detection": 64}  # a dense map and two label maps
DUPLICATES = {"text_decoder.lm_head.decoder.weight", "text_decoder.lm_head.decoder.bias",
              "text_decoder.roberta.embeddings.position_ids"}


def _saved(directory, experts):
  state = _reference_state(experts)
  path = directory / "pytorch_model.bin"
  torch.save(state, path)
  return {k: v.numpy() for k, v in state.items()}, str(path)


@pytest.fixture(scope="module")
def prismerz(tmp_path_factory):
  return _saved(tmp_path_factory.mktemp("prismerz"), {})


@pytest.fixture(scope="module")
def with_experts(tmp_path_factory):
  return _saved(tmp_path_factory.mktemp("prismer"), EXPERTS)


@pytest.fixture(params=["prismerz", "with_experts"])
def release(request):
  return request.getfixturevalue(request.param)


def test_every_key_is_consumed_once(release):
  state, path = release
  checkpoint = released.open_sources(prismer, {"checkpoint": path})
  model, batch = released.build(prismer, checkpoint, HEADS)
  experts = tuple(e for e in expert_vit.EXPERTS if f"expert_encoder.conv1.{e}.1.weight" in state)
  assert (model.lm.num_layers, model.vision.depth, model.vision.image_size,
          model.vision.experts) == (LAYERS, LAYERS, SIZE, experts)
  assert model.vision.expert_stem_norm == ("batch" if experts else "layer")
  used = released.consumers(prismer, checkpoint, model, released.target_of(model, batch))
  assert all(len(targets) == 1 for targets in used.values())
  counts = {n for n in state if n.endswith(".num_batches_tracked")}
  assert len(counts) == 4 * len(experts)
  assert {n.removeprefix("checkpoint:") for n in used} == set(state) - DUPLICATES - counts
  assert used["checkpoint:text_decoder.roberta.encoder.layer.1.1.self.key.weight"] == [
      ("decoder/layers/cross_attention/key/kernel",)]
  if experts:
    assert used["checkpoint:expert_encoder.conv1.seg.8.running_var"] == [
        ("vision/embedder/stem_seg/norm_2/var",)]


def test_values_land_and_the_export_reproduces_the_file(release, tmp_path):
  state, path = release
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
    # BatchNorm's count of training batches is not kept (docstring of convert/prismer.py).
    want = np.zeros((), np.int64) if name.endswith(".num_batches_tracked") else state[name]
    np.testing.assert_array_equal(value, want, err_msg=name)
    assert value.dtype == state[name].dtype, name


@pytest.fixture(scope="module")
def imported_with_experts(with_experts):
  return released.import_released(prismer, {"checkpoint": with_experts[1]}, HEADS,
                                  log=lambda _: None)


@pytest.mark.parametrize("expert", ["depth", "seg"])
def test_an_imported_expert_stem_computes_what_the_reference_stem_computes(
    with_experts, imported_with_experts, expert):
  """The torch stem (random weights, running statistics far from 0/1, eval mode) loaded from
  the file and ours imported from it: dense maps are resized up, label maps down."""
  state, _ = with_experts
  model, params = imported_with_experts
  label = expert in expert_vit.LABEL_EXPERTS
  reference = torch_stem(EXPERTS[expert], VISION, PATCH, label).eval()
  prefix = f"expert_encoder.conv1.{expert}."
  reference.load_state_dict({k[len(prefix):]: torch.from_numpy(v) for k, v in state.items()
                             if k.startswith(prefix)})
  maps = np.random.default_rng(0).normal(size=(2, SIZE, SIZE, EXPERTS[expert]))
  maps = maps.astype(np.float32)
  with torch.no_grad():
    want = reference(torch.from_numpy(maps).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  ours = expert_stem.ExpertStem(
      VISION, expert_stem.LABEL_STRIDES if label else expert_stem.DENSE_STRIDES,
      model.vision.expert_stem_norm)
  grid = (SIZE // PATCH, SIZE // PATCH)
  got = ours.apply({"params": params["vision"]["embedder"][f"stem_{expert}"]}, maps, grid)
  assert got.shape == want.shape == (2, *grid, VISION)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_a_model_with_layernorm_expert_stems_is_refused_both_ways(with_experts):
  _, path = with_experts
  checkpoint = released.open_sources(prismer, {"checkpoint": path})
  model, _ = released.build(prismer, checkpoint,
                            dict(HEADS, **{"vision.expert_stem_norm": "layer"}))
  assert model.vision.experts == tuple(EXPERTS)
  for source, which in ((checkpoint, "checkpoint"), (None, "export")):
    with pytest.raises(released.ConversionError,
                       match=rf"{which}.*: Prismer's expert stems normalise with BatchNorm, the "
                             r"model's .* with expert_stem_norm='layer'; build it with "
                             r"config.model.vision.expert_stem_norm='batch'"):
      prismer.layout(model, source)


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


def test_command_line_import_with_experts_into_a_run_of_the_config(tmp_path):
  """`vlm-convert import --config configs/prismer.py:tiny,stem_norm=batch --workdir RUN`
  (docs/weights.md) on a prismer_* file of tiny's sizes: step 0 holds its stems' statistics."""
  import os  # pylint: disable=g-import-not-at-top
  from vlm_jax import params as params_lib  # pylint: disable=g-import-not-at-top
  from vlm_jax.cli import convert as cli  # pylint: disable=g-import-not-at-top
  state = _reference_state(EXPERTS, text=64, vision=64, vocab=1024, positions=514, size=64)
  torch.save(state, tmp_path / "pytorch_model.bin")
  config = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "prismer.py")
  cli.main(["import", str(tmp_path / "pytorch_model.bin"), "--layout", "prismer", "--config",
            f"{config}:tiny,stem_norm=batch", "--config.model.vision.num_latents=8",
            "--workdir", str(tmp_path / "run")])
  var = state["expert_encoder.conv1.seg.11.running_var"].numpy()
  path = "vision/embedder/stem_seg/norm_3/var"
  saved, step = params_lib.read_checkpoint(str(tmp_path / "run"), {
      path: jax.ShapeDtypeStruct(var.shape, var.dtype)})
  assert step == 0
  np.testing.assert_array_equal(np.asarray(saved[path]), var)
