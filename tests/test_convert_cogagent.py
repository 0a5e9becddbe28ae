"""CogAgent's HF release layout (THUDM/cogagent-chat-hf: config.json + safetensors of
CogAgentForCausalLM, names from its modeling_cogagent.py / visual.py / cross_visual.py) at a
tiny size: every LM / cross-attention / adapter key is consumed once, the vision towers
(which our pre-LN ViTs cannot represent) are ignored and keep their initialisation, and the
export reproduces the imported tensors exactly."""
import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from vlm_jax.convert import cogagent, released

D, HEADS, MLP, VOCAB, LAYERS = 32, 4, 48, 40, 2
CROSS, CROSS_IN = 32, 24  # cross_compute_hidden_size, cross_hidden_size
VISION = dict(hidden_size=16, num_hidden_layers=2, num_heads=2, intermediate_size=32,
              patch_size=4, image_size=8, in_channels=3, num_positions=5, hidden_act="gelu",
              layer_norm_eps=1e-6, dropout_prob=0.0)
HIGH_RES = {"high_res.depth": 1, "high_res.num_heads": 2, "high_res.mlp_dim": 32}


def _reference_state(d=D, heads=HEADS, mlp=MLP, vocab=VOCAB, layers=LAYERS, cross=CROSS,
                     cross_in=CROSS_IN, vision=None) -> dict:
  vision = vision or VISION
  rng = np.random.default_rng(0)
  state = {}

  def add(name, *shape):
    state[name] = (0.2 * rng.standard_normal(shape)).astype(np.float32)

  add("model.embed_tokens.weight", vocab, d)
  add("model.norm.weight", d)
  add("lm_head.weight", vocab, d)
  for i in range(layers):
    b = f"model.layers.{i}."
    for norm in ("input_layernorm", "post_attention_layernorm", "post_cross_attention_layernorm"):
      add(b + norm + ".weight", d)
    for expert in ("language", "vision"):
      add(f"{b}self_attn.{expert}_expert_query_key_value.weight", 3 * d, d)
      add(f"{b}self_attn.{expert}_expert_dense.weight", d, d)
      add(f"{b}mlp.{expert}_mlp.gate_proj.weight", mlp, d)
      add(f"{b}mlp.{expert}_mlp.up_proj.weight", mlp, d)
      add(f"{b}mlp.{expert}_mlp.down_proj.weight", d, mlp)
    head_dim = d // heads
    state[b + "self_attn.rotary_emb.inv_freq"] = (
        1.0 / 10_000 ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    add(b + "cross_attn.query.weight", cross, d)
    add(b + "cross_attn.key_value.weight", 2 * cross, cross_in)
    add(b + "cross_attn.dense.weight", d, cross)
  v, width = "model.vision.", vision["hidden_size"]
  add(v + "patch_embedding.proj.weight", width, 3, 4, 4)
  add(v + "patch_embedding.proj.bias", width)
  add(v + "patch_embedding.cls_embedding", 1, width)
  add(v + "patch_embedding.position_embedding.weight", vision["num_positions"], width)
  for i in range(vision["num_hidden_layers"]):
    b = f"{v}transformer.layers.{i}."
    for name, shape in (("input_layernorm", (width,)), ("post_attention_layernorm", (width,)),
                        ("attention.query_key_value", (3 * width, width)),
                        ("attention.dense", (width, width)), ("mlp.fc1", (32, width)),
                        ("mlp.fc2", (width, 32))):
      add(b + name + ".weight", *shape)
      add(b + name + ".bias", shape[0])
  add(v + "linear_proj.linear_proj.weight", d, width)
  add(v + "linear_proj.norm1.weight", d)
  add(v + "linear_proj.norm1.bias", d)
  add(v + "linear_proj.gate_proj.weight", mlp, d)
  add(v + "linear_proj.dense_h_to_4h.weight", mlp, d)
  add(v + "linear_proj.dense_4h_to_h.weight", d, mlp)
  add(v + "boi", 1, 1, d)
  add(v + "eoi", 1, 1, d)
  c = "model.cross_vision."  # EVA-02-L (cross_visual.py): ignored whole
  add(c + "vit.model.visual.patch_embed.proj.weight", cross_in, 3, 14, 14)
  add(c + "vit.model.visual.blocks.0.attn.q_proj.weight", cross_in, cross_in)
  add(c + "pos_embed", 4, cross_in)
  return state


def write_release(root, **sizes) -> dict:
  """cogagent-chat-hf's files (model.safetensors, config.json) in `root`, `_reference_state`'s
  sizes; returns the state."""
  state = _reference_state(**sizes)
  save_file(state, root / "model.safetensors", metadata={"format": "pt"})
  d, mlp = sizes.get("d", D), sizes.get("mlp", MLP)
  config = {"architectures": ["CogAgentForCausalLM"], "model_type": "cogagent",
            "vocab_size": sizes.get("vocab", VOCAB), "hidden_size": d, "intermediate_size": mlp,
            "num_hidden_layers": sizes.get("layers", LAYERS),
            "num_attention_heads": sizes.get("heads", HEADS), "rms_norm_eps": 1e-5,
            "hidden_act": "silu", "cross_compute_hidden_size": sizes.get("cross", CROSS),
            "cross_hidden_size": sizes.get("cross_in", CROSS_IN), "cross_image_size": 28,
            "vision_config": sizes.get("vision", VISION)}
  (root / "config.json").write_text(json.dumps(config))
  return state


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  root = tmp_path_factory.mktemp("cogagent")
  return write_release(root), str(root)


def _import(path, log=lambda _: None):
  return released.import_released(cogagent, {"checkpoint": path}, HIGH_RES, log=log)


def test_every_lm_and_adapter_key_is_consumed_once_and_the_towers_are_named(release):
  state, path = release
  checkpoint = released.open_sources(cogagent, {"checkpoint": path})
  model, batch = released.build(cogagent, checkpoint, HIGH_RES)
  layer = model.lm.layer_kwargs
  assert (layer["visual_expert"], model.high_res is not None, layer["cross_heads"]) == (
      True, True, HEADS)
  used = released.consumers(cogagent, checkpoint, model, released.target_of(model, batch))
  assert all(len(targets) == 1 for targets in used.values())
  towers = {k for k in state if k.startswith(("model.vision.patch_embedding.",
                                              "model.vision.transformer.", "model.cross_vision."))}
  buffers = {k for k in state if k.endswith("rotary_emb.inv_freq")}
  assert {n.removeprefix("checkpoint:") for n in used} == set(state) - towers - buffers
  assert used["checkpoint:model.layers.1.cross_attn.key_value.weight"] == [
      ("lm/layers/layers/cross_attention/key/kernel",
       "lm/layers/layers/cross_attention/value/kernel")]


def test_values_and_the_log_of_what_keeps_its_initialisation(release):
  state, path = release
  logged = []
  _, params = _import(path, logged.append)
  assert [line.split(": ")[0] + ": " + line.split(": ")[1] for line in logged[1:]] == [
      "WARNING: 22 parameter arrays vision/.* keep their initialisation",
      "WARNING: 22 parameter arrays high_res/.* keep their initialisation"]
  layers = params["lm"]["layers"]["layers"]
  qkv = state["model.layers.1.self_attn.vision_expert_query_key_value.weight"]
  np.testing.assert_array_equal(np.asarray(layers["self_attention"]["vision_key"]["kernel"][1]),
                                qkv[D:2 * D].T.reshape(D, HEADS, D // HEADS))
  kv = state["model.layers.0.cross_attn.key_value.weight"]
  np.testing.assert_array_equal(np.asarray(layers["cross_attention"]["value"]["kernel"][0]),
                                kv[CROSS:].T.reshape(CROSS_IN, HEADS, CROSS // HEADS))
  np.testing.assert_array_equal(np.asarray(params["adapter"]["boi"]),
                                state["model.vision.boi"].reshape(-1))
  assert params["vision"]["encoder"]["layers"]["mlp"]["wi"]["kernel"].shape == (2, 16, 32)


def test_export_reproduces_the_imported_tensors(release, tmp_path):
  state, path = release
  model, params = _import(path)
  released.export_released(cogagent, params, model, str(tmp_path))
  exported = load_file(tmp_path / "checkpoint" / "model.safetensors")
  towers = ("model.vision.patch_embedding.", "model.vision.transformer.", "model.cross_vision.")
  assert sorted(exported) == sorted(k for k in state if not k.startswith(towers))
  for name, value in exported.items():
    np.testing.assert_array_equal(value, state[name], err_msg=name)
  config = json.loads((tmp_path / "checkpoint" / "config.json").read_text())
  assert (config["cross_compute_hidden_size"], config["num_hidden_layers"]) == (CROSS, LAYERS)


def test_command_line_import(release, tmp_path, capsys):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from vlm_jax.cli import convert as cli  # pylint: disable=g-import-not-at-top
  state, path = release
  cli.main(["import", path, "--layout", "cogagent", "--set", "high_res.depth=1", "--set",
            "high_res.num_heads=2", "--set", "high_res.mlp_dim=32", "--out", str(tmp_path / "p")])
  assert "keep their initialisation" in capsys.readouterr().out
  with ocp.StandardCheckpointer() as reader:
    params = reader.restore(tmp_path / "p")
  np.testing.assert_array_equal(params["lm"]["embed"]["embedding"],
                                state["model.embed_tokens.weight"])
