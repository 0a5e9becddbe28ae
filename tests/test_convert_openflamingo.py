"""OpenFlamingo's released layout against open-flamingo's own `Flamingo` (PyTorch, CPU).

For each LM layout OpenFlamingo supports (MPT, GPT-NeoX/RedPajama, LLaMA), the test builds
the reference model as `open_flamingo.create_model_and_transforms` does, from random tiny
parts: a transformers LM (saved first, as its HF directory), an open_clip
`VisionTransformer` (open_clip_torch 2.20, the version OpenFlamingo was trained with; saved
as `open_clip_pytorch_model.bin`), `extend_instance(FlamingoLMMixin)`,
`resize_token_embeddings`, `Flamingo(...)`; then saves the trainable part as open_flamingo's
`filter_state_dict_to_trainable` does (`checkpoint.pt`). Our Flamingo imported from these
three files must give the same logits on interleaved documents (several images, text
before the first image, a document without images, left and right padding), and its export
must reproduce the files. open_flamingo's and open_clip's packages import optional
dependencies at import time (open_clip, torchvision), so their model files are loaded from
the installed packages without the package `__init__` (DESIGN.md).
"""
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import types

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from vlm_jax.convert import openflamingo, released

V_LM, ADDED = 61, 3  # the LM's vocabulary; <|endofchunk|>, <image>, <PAD> are added
V = V_LM + ADDED
EOC, IMAGE, PAD = V - 3, V - 2, V - 1
WIDTH, VISION, SIZE, PATCH = 32, 32, 16, 8
LENGTH, MEDIA = 12, 2
VISION_HEADS = {"vision.num_heads": 4}  # open_clip head width 64 would give 0 here


def _package(name: str, spec_name: str, subdirectory: str = "", stubs: dict | None = None):
  """Registers `name` as a package over the installed `spec_name` package's `subdirectory`
  without running any __init__, plus stub submodules."""
  spec = importlib.util.find_spec(spec_name)
  assert spec is not None, f"{spec_name} is a test dependency (README's test command)"
  package = types.ModuleType(name)
  package.__path__ = [os.path.join(os.path.dirname(spec.origin), subdirectory)]
  sys.modules[name] = package
  for sub, module in (stubs or {}).items():
    sys.modules[f"{name}.{sub}"] = module


def open_flamingo_reference():
  """open_flamingo's src modules and open_clip's transformer module."""
  # OpenFlamingo was trained on open_clip < 2.23's token output (no ln_post on the tokens).
  assert importlib.metadata.version("open_clip_torch") == "2.20.0", "README's test command"
  _package("_open_flamingo_src", "open_flamingo", "src")
  # open_clip/utils.py imports torchvision for a BatchNorm helper; transformer.py needs only
  # its to_2tuple.
  stub = types.ModuleType("_open_clip_pkg.utils")
  stub.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
  _package("_open_clip_pkg", "open_clip", stubs={"utils": stub})
  return types.SimpleNamespace(
      flamingo=importlib.import_module("_open_flamingo_src.flamingo"),
      flamingo_lm=importlib.import_module("_open_flamingo_src.flamingo_lm"),
      utils=importlib.import_module("_open_flamingo_src.utils"),
      open_clip=importlib.import_module("_open_clip_pkg.transformer"))


@pytest.fixture(scope="module")
def reference():
  return open_flamingo_reference()


def _lm(style: str, width: int = WIDTH, layers: int = 4, vocab: int = V_LM):
  if style == "mpt":
    return transformers.MptForCausalLM(transformers.MptConfig(
        d_model=width, n_heads=4, n_layers=layers, expansion_ratio=4, max_seq_len=32,
        vocab_size=vocab, attn_config={"alibi_bias_max": 8}))
  if style == "gpt_neox":
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=layers, num_attention_heads=4, rotary_pct=1.0,
        use_parallel_residual=True, tie_word_embeddings=False))
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=width, intermediate_size=3 * width // 2,
      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
      rms_norm_eps=1e-5, tie_word_embeddings=False))


def _perturb(module, scale=0.1):
  """transformers / torch initialise norms to 1 and biases / gates to 0: move every param so
  each mapping matters."""
  with torch.no_grad():
    for p in module.parameters():
      p.add_(scale * torch.randn_like(p))


class _CLIP(torch.nn.Module):
  """What create_model_and_transforms hands to Flamingo: an open_clip model with `.visual`."""

  def __init__(self, visual):
    super().__init__()
    self.visual = visual


def _trainable_state_dict(model) -> dict:
  """open_flamingo.train.train_utils.filter_state_dict_to_trainable (that module imports
  wandb): drop frozen params unless "embed" is in their name, then the duplicate
  old_decoder_blocks / gated_cross_attn_layers entries and the vision encoder."""
  state = model.state_dict()
  for name, p in model.named_parameters():
    if "embed" not in name and not p.requires_grad:
      state.pop(name, None)
  skip = ("lang_encoder.old_decoder_blocks", "lang_encoder.gated_cross_attn_layers",
          "vision_encoder")
  return {k: v for k, v in state.items() if not any(s in k for s in skip)}


def _documents(seed=0):
  """Row 0: text, <image>, text, <image>, text, <|endofchunk|>, text; row 1: no image,
  left-padded; row 2: <image> first, right-padded."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, V_LM, (3, LENGTH))
  tokens[0, [2, 5]], tokens[0, 8] = IMAGE, EOC
  tokens[1, :3] = PAD
  tokens[2, 0], tokens[2, 4], tokens[2, 7:] = IMAGE, EOC, PAD
  pixels = rng.standard_normal((3, MEDIA, 3, SIZE, SIZE)).astype(np.float32)
  batch = {"tokens": tokens.astype(np.int32), "token_mask": (tokens != PAD).astype(np.float32),
           "images": pixels.transpose(0, 1, 3, 4, 2),
           "image_positions": np.array([[2, 5], [0, 0], [0, 0]], np.int32),
           "image_mask": np.array([[1, 1], [0, 0], [1, 0]], np.float32)}
  return batch, pixels


# (LM layout, cross-attention interval)
STYLES = [("mpt", 1), ("gpt_neox", 2), ("llama", 4)]


def write_release(reference, root, style: str, interval: int, *, width: int = WIDTH,
                  layers: int = 4, lm_vocab: int = V_LM, vision: int = VISION,
                  vision_layers: int = 2, vision_heads: int = 4, size: int = SIZE,
                  patch: int = PATCH, image_id: int = IMAGE, eoc_id: int = EOC):
  """Writes a release's three files in `root` (lm/, open_clip_pytorch_model.bin,
  checkpoint.pt) as create_model_and_transforms + filter_state_dict_to_trainable make them;
  returns (reference Flamingo, {source: path}, the saved trainable state, original LM)."""
  torch.manual_seed(0)
  lm = _lm(style, width, layers, lm_vocab)
  _perturb(lm)
  lm.eval().save_pretrained(root / "lm", safe_serialization=True)
  original_lm = {k: v.clone() for k, v in lm.state_dict().items()}
  reference.utils.extend_instance(lm, reference.flamingo_lm.FlamingoLMMixin)
  lm.set_decoder_layers_attr_name(openflamingo.DECODER_LAYERS[style])
  lm.resize_token_embeddings(lm_vocab + ADDED)
  oc = reference.open_clip
  visual = oc.VisionTransformer(image_size=size, patch_size=patch, width=vision,
                                layers=vision_layers, heads=vision_heads, mlp_ratio=4.0,
                                output_dim=24, act_layer=oc.QuickGELU, output_tokens=True)
  _perturb(visual)
  torch.save({"visual." + k: v for k, v in visual.state_dict().items()},
             root / "open_clip_pytorch_model.bin")
  model = reference.flamingo.Flamingo(_CLIP(visual), lm, eoc_token_id=eoc_id,
                                      media_token_id=image_id, vis_dim=vision,
                                      cross_attn_every_n_layers=interval)
  _perturb(model.perceiver)
  _perturb(model.lang_encoder.gated_cross_attn_layers, scale=0.5)  # opens the gates
  model.eval()
  # create_model_and_transforms: freeze all, unfreeze perceiver, gated blocks, embeddings
  model.requires_grad_(False)
  model.perceiver.requires_grad_(True)
  model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
  model.lang_encoder.get_input_embeddings().requires_grad_(True)
  state = _trainable_state_dict(model)
  if style == "gpt_neox":  # transformers < 5 (OpenFlamingo's) named this head embed_out, which
    state["lang_encoder.embed_out.weight"] = lm.get_output_embeddings().weight  # the filter keeps
  torch.save(state, root / "checkpoint.pt")
  if style == "llama":  # rows of the added tokens in the untied head: random in OpenFlamingo,
    with torch.no_grad():  # zero in our import (openflamingo.py docstring)
      model.lang_encoder.lm_head.weight[lm_vocab:] = 0
  paths = {"checkpoint": str(root / "checkpoint.pt"), "lm": str(root / "lm"),
           "vision": str(root / "open_clip_pytorch_model.bin")}
  return model, paths, {k: v.numpy() for k, v in state.items()}, original_lm


@pytest.fixture(scope="module", params=STYLES, ids=[s for s, _ in STYLES])
def release(request, reference, tmp_path_factory):
  """(reference Flamingo, {source: path}, the saved trainable state dict, original LM,
  style)."""
  style, interval = request.param
  return (*write_release(reference, tmp_path_factory.mktemp(style), style, interval), style)


@pytest.fixture(scope="module")
def imported(release):
  _, paths, _, _, _ = release
  return released.import_released(openflamingo, paths, VISION_HEADS, log=lambda _: None)


def test_released_checkpoint_holds_the_trainable_part(release):
  _, _, state, _, style = release
  prefixes = {k.split(".")[0] for k in state}
  assert prefixes == {"perceiver", "lang_encoder"}
  blocks = {k for k in state if ".gated_cross_attn_layer." in k}
  assert blocks and all(k.startswith(f"lang_encoder.{openflamingo.DECODER_LAYERS[style]}.")
                        for k in blocks)
  assert f"lang_encoder.{openflamingo.LM_TABLES[style][0]}" in state


def test_whole_model_logits_match_open_flamingo(release, imported):
  reference, _, _, _, style = release
  model, params = imported
  assert (model.vision.post_norm, model.new_token_ids) == ("class", (IMAGE, EOC))
  batch, pixels = _documents()
  with torch.no_grad():
    want = reference(vision_x=torch.from_numpy(pixels)[:, :, None],
                     lang_x=torch.from_numpy(batch["tokens"]).long(),
                     attention_mask=torch.from_numpy(batch["token_mask"]).long()).logits.numpy()
  got = np.asarray(jax.jit(model.apply)({"params": params}, batch))
  valid = batch["token_mask"] > 0
  diff = np.abs(got[valid] - want[valid]).max()
  print(f"OpenFlamingo ({style}) whole-model logits max abs diff: {diff:.2e}")
  assert diff < 1e-4
  # The images matter: another first image changes row 0 from its first <image> on only.
  other = dict(batch, images=batch["images"][:, ::-1])
  changed = np.asarray(jax.jit(model.apply)({"params": params}, other))
  np.testing.assert_array_equal(changed[0, :2], got[0, :2])
  assert np.abs(changed[0, 2:] - got[0, 2:]).max() > 1e-3
  np.testing.assert_array_equal(changed[1][valid[1]], got[1][valid[1]])


def test_export_reproduces_the_released_files(release, imported, tmp_path):
  _, paths, state, original_lm, style = release
  model, params = imported
  written = released.export_released(openflamingo, params, model, str(tmp_path))
  assert sorted(written) == ["checkpoint", "lm", "vision"]
  checkpoint = load_file(tmp_path / "checkpoint" / "model.safetensors")
  tied_copy = "lang_encoder.lm_head.weight"  # MPT's state dict lists the tied table twice
  assert sorted(checkpoint) == sorted(k for k in state if k != tied_copy)
  for name, value in checkpoint.items():
    np.testing.assert_array_equal(value, state[name].reshape(value.shape), err_msg=name)
  visual = torch.load(paths["vision"], weights_only=True)
  exported_visual = load_file(tmp_path / "vision" / "model.safetensors")
  assert sorted(exported_visual) == sorted(k for k in visual if k != "visual.proj")
  for name, value in exported_visual.items():
    np.testing.assert_array_equal(value, visual[name].numpy(), err_msg=name)
  lm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lm")
  table = state["lang_encoder." + openflamingo.LM_TABLES[style][0]]  # trained, resized
  head = {"mpt": table, "gpt_neox": state.get("lang_encoder.embed_out.weight"),
          "llama": np.pad(original_lm["lm_head.weight"].numpy(), ((0, ADDED), (0, 0)))}[style]
  np.testing.assert_array_equal(lm.get_input_embeddings().weight.detach().numpy(), table)
  np.testing.assert_array_equal(lm.get_output_embeddings().weight.detach().numpy(), head)
  tables = {id(lm.get_input_embeddings().weight), id(lm.get_output_embeddings().weight)}
  for name, value in lm.named_parameters():
    if id(value) not in tables:
      np.testing.assert_array_equal(value.detach().numpy(), original_lm[name].numpy(),
                                    err_msg=name)
  again = released.import_released(
      openflamingo, {s: str(tmp_path / s) for s in openflamingo.SOURCES}, VISION_HEADS,
      log=lambda _: None)[1]
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_deprecated_release_names_and_buffers_are_read(release, imported, tmp_path):
  """The deprecated LLaMA release (OpenFlamingo-9B-deprecated) names every gated block
  lang_encoder.gated_cross_attn_layers.{i}.* (alone, or beside the decoder-layer copy) and
  older transformers saved rotary buffers: the same parameters result."""
  _, paths, state, _, style = release
  layers = f"lang_encoder.{openflamingo.DECODER_LAYERS[style]}"
  v1 = {k: v for k, v in state.items() if ".gated_cross_attn_layer." not in k}
  for name in set(state) - set(v1):
    i, rest = name[len(layers) + 1:].split(".gated_cross_attn_layer.")
    v1[f"lang_encoder.gated_cross_attn_layers.{i}.{rest}"] = state[name]
  v1[f"{layers}.0.decoder_layer.attention.rotary_emb.inv_freq"] = np.ones(4, np.float32)
  for file, tensors in (("v1.pt", v1), ("both.pt", {**state, **v1})):
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in tensors.items()},
               tmp_path / file)
    _, params = released.import_released(
        openflamingo, dict(paths, checkpoint=str(tmp_path / file)), VISION_HEADS,
        log=lambda _: None)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(imported[1])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _Payload:
  def __reduce__(self):
    return (os.system, ("echo never run",))


def test_a_checkpoint_that_needs_arbitrary_objects_is_refused(release, tmp_path):
  _, paths, _, _, _ = release
  torch.save({"perceiver.latents": torch.zeros(2), "extra": _Payload()}, tmp_path / "bad.pt")
  with pytest.raises(released.ConversionError, match=r"bad.pt: not a plain state dict; torch's "
                                                     r"safe loader \(weights_only=True\)"):
    released.import_released(openflamingo, dict(paths, checkpoint=str(tmp_path / "bad.pt")))
  with pytest.raises(released.ConversionError, match=r"sources \['vision'\] are missing"):
    released.import_released(openflamingo, {"checkpoint": paths["checkpoint"], "lm": paths["lm"]})


def test_command_line_import(release, imported, tmp_path, capsys):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from vlm_jax.cli import convert as cli  # pylint: disable=g-import-not-at-top
  _, paths, _, _, _ = release
  cli.main(["import", paths["checkpoint"], "--layout", "openflamingo", "--lm", paths["lm"],
            "--vision", paths["vision"], "--set", "vision.num_heads=4", "--out",
            str(tmp_path / "params")])
  assert "Saved the imported parameters" in capsys.readouterr().out
  with ocp.StandardCheckpointer() as reader:
    params = reader.restore(tmp_path / "params")
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(imported[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
