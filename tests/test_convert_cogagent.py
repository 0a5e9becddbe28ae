"""CogAgent's HF release layout (THUDM/cogagent-chat-hf: config.json + safetensors of
CogAgentForCausalLM, names from its modeling_cogagent.py / visual.py / cross_visual.py) at a
tiny size: every published key (the LM, cross-attention, adapter and both vision towers) is
consumed once, except what the release stores but never uses (rotary buffers, the high-res
tower's last block, final norm and head), and the export reproduces the imported tensors
exactly. tests/test_cogagent_towers.py checks the towers' outputs against torch."""
import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from vlm_jax.convert import cogagent, released

D, HEADS, MLP, VOCAB, LAYERS = 32, 4, 48, 40, 2
CROSS, CROSS_IN = 32, 128  # cross_compute_hidden_size, cross_hidden_size (2 EVA-02 heads)
VISION = dict(hidden_size=16, num_hidden_layers=2, num_heads=2, intermediate_size=32,
              patch_size=4, image_size=8, in_channels=3, num_positions=5, hidden_act="gelu",
              layer_norm_eps=1e-6, dropout_prob=0.0)
CROSS_IMAGE, CROSS_PATCH, CROSS_BLOCKS, CROSS_MLP = 28, 14, 2, 40  # blocks stored (1 used)
LOW, HIGH = "model.vision.", "model.cross_vision.vit.model."
# stored but never used: the last EVA-02 block, the final norm and head, the rotary buffers
# (vLLM's loader skips `cross_vision.vit.model.rope`)
UNUSED = (HIGH + f"blocks.{CROSS_BLOCKS - 1}.", HIGH + "norm.", HIGH + "head.", HIGH + "rope.")


def _reference_state(d=D, heads=HEADS, mlp=MLP, vocab=VOCAB, layers=LAYERS, cross=CROSS,
                     cross_in=CROSS_IN, vision=None, cross_image=CROSS_IMAGE,
                     cross_blocks=CROSS_BLOCKS, cross_mlp=CROSS_MLP, towers=None) -> dict:
  """Every published tensor, random; `towers` (name -> array) replaces the towers' ones."""
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
  add(LOW + "linear_proj.linear_proj.weight", d, vision["hidden_size"])
  add(LOW + "linear_proj.norm1.weight", d)
  add(LOW + "linear_proj.norm1.bias", d)
  add(LOW + "linear_proj.gate_proj.weight", mlp, d)
  add(LOW + "linear_proj.dense_h_to_4h.weight", mlp, d)
  add(LOW + "linear_proj.dense_4h_to_h.weight", d, mlp)
  add(LOW + "boi", 1, 1, d)
  add(LOW + "eoi", 1, 1, d)
  if towers is not None:
    return {**state, **towers}
  width, hidden, p = vision["hidden_size"], vision["intermediate_size"], vision["patch_size"]
  add(LOW + "patch_embedding.proj.weight", width, 3, p, p)
  add(LOW + "patch_embedding.proj.bias", width)
  add(LOW + "patch_embedding.cls_embedding", 1, width)
  add(LOW + "patch_embedding.position_embedding.weight", vision["num_positions"], width)
  add(LOW + "pos_embed", vision["num_positions"] - 1, width)
  for i in range(vision["num_hidden_layers"]):
    b = f"{LOW}transformer.layers.{i}."
    for name, shape in (("input_layernorm", (width,)), ("post_attention_layernorm", (width,)),
                        ("attention.query_key_value", (3 * width, width)),
                        ("attention.dense", (width, width)), ("mlp.fc1", (hidden, width)),
                        ("mlp.fc2", (width, hidden))):
      add(b + name + ".weight", *shape)
      add(b + name + ".bias", shape[0])
  c, patches = cross_in, (cross_image // CROSS_PATCH) ** 2
  add(HIGH + "patch_embed.proj.weight", c, 3, CROSS_PATCH, CROSS_PATCH)
  add(HIGH + "patch_embed.proj.bias", c)
  add(HIGH + "cls_token", 1, 1, c)
  add(HIGH + "pos_embed", 1, 1 + patches, c)
  for i in range(cross_blocks):
    b = f"{HIGH}blocks.{i}."
    for name, shape in (("norm1", (c,)), ("norm2", (c,)), ("attn.inner_attn_ln", (c,)),
                        ("attn.proj", (c, c)), ("mlp.ffn_ln", (cross_mlp,)),
                        ("mlp.w1", (cross_mlp, c)), ("mlp.w2", (cross_mlp, c)),
                        ("mlp.w3", (c, cross_mlp))):
      add(b + name + ".weight", *shape)
      add(b + name + ".bias", shape[0])
    for name in ("q_proj", "k_proj", "v_proj"):
      add(f"{b}attn.{name}.weight", c, c)
    add(b + "attn.q_bias", c)
    add(b + "attn.v_bias", c)
  add(HIGH + "norm.weight", c)
  add(HIGH + "norm.bias", c)
  add(HIGH + "head.weight", 12, c)
  add(HIGH + "head.bias", 12)
  add("model.cross_vision.pos_embed", patches, c)
  add(HIGH + "rope.freqs_cos", patches, 64)
  add(HIGH + "rope.freqs_sin", patches, 64)
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
            "cross_hidden_size": sizes.get("cross_in", CROSS_IN),
            "cross_image_size": sizes.get("cross_image", CROSS_IMAGE),
            "vision_config": sizes.get("vision", VISION)}
  (root / "config.json").write_text(json.dumps(config))
  return state


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  root = tmp_path_factory.mktemp("cogagent")
  return write_release(root), str(root)


def _import(path, log=lambda _: None):
  return released.import_released(cogagent, {"checkpoint": path}, log=log)


def test_every_published_key_is_consumed_once_except_the_unused_ones(release):
  state, path = release
  checkpoint = released.open_sources(cogagent, {"checkpoint": path})
  model, batch = released.build(cogagent, checkpoint)
  layer = model.lm.layer_kwargs
  assert (layer["visual_expert"], model.high_res is not None, layer["cross_heads"]) == (
      True, True, HEADS)
  assert (model.high_res.depth, model.high_res.num_heads, model.high_res.mlp_dim,
          model.vision.branch_norm, model.high_res.rotary_2d) == (
              CROSS_BLOCKS - 1, CROSS_IN // 64, CROSS_MLP, "post", True)
  used = released.consumers(cogagent, checkpoint, model, released.target_of(model, batch))
  assert all(len(targets) == 1 for targets in used.values())
  unused = {k for k in state if k.startswith(UNUSED) or k.endswith("rotary_emb.inv_freq")}
  assert {n.removeprefix("checkpoint:") for n in used} == set(state) - unused
  assert len(unused) == LAYERS + 21 + 4 + 2  # inv_freq; an EVA-02 block; norm, head; rope
  assert used["checkpoint:model.layers.1.cross_attn.key_value.weight"] == [
      ("lm/layers/layers/cross_attention/key/kernel",
       "lm/layers/layers/cross_attention/value/kernel")]
  assert used[f"checkpoint:{HIGH}blocks.0.attn.q_bias"] == [
      ("high_res/encoder/layers/self_attention/query/bias",)]
  assert used[f"checkpoint:{LOW}transformer.layers.1.input_layernorm.weight"] == [
      ("vision/encoder/layers/post_attention_norm/scale",)]


def test_values_and_no_parameter_keeps_its_initialisation(release):
  state, path = release
  logged = []
  _, params = _import(path, logged.append)
  assert len(logged) == 1 and "WARNING" not in logged[0]
  layers = params["lm"]["layers"]["layers"]
  qkv = state["model.layers.1.self_attn.vision_expert_query_key_value.weight"]
  np.testing.assert_array_equal(np.asarray(layers["self_attention"]["vision_key"]["kernel"][1]),
                                qkv[D:2 * D].T.reshape(D, HEADS, D // HEADS))
  kv = state["model.layers.0.cross_attn.key_value.weight"]
  np.testing.assert_array_equal(np.asarray(layers["cross_attention"]["value"]["kernel"][0]),
                                kv[CROSS:].T.reshape(CROSS_IN, HEADS, CROSS // HEADS))
  np.testing.assert_array_equal(np.asarray(params["adapter"]["boi"]),
                                state["model.vision.boi"].reshape(-1))
  low = params["vision"]["encoder"]["layers"]["self_attention"]
  bias = state[f"{LOW}transformer.layers.1.attention.query_key_value.bias"]
  np.testing.assert_array_equal(np.asarray(low["value"]["bias"][1]), bias[32:].reshape(2, 8))
  high = params["high_res"]["encoder"]["layers"]
  np.testing.assert_array_equal(np.asarray(high["mlp"]["hidden_norm"]["scale"][0]),
                                state[f"{HIGH}blocks.0.mlp.ffn_ln.weight"])
  assert "bias" not in high["self_attention"]["key"]
  np.testing.assert_array_equal(np.asarray(params["high_res"]["pos_embedding"]["pos_embedding"]),
                                state[f"{HIGH}pos_embed"][0])


def test_export_reproduces_the_imported_tensors(release, tmp_path):
  state, path = release
  model, params = _import(path)
  released.export_released(cogagent, params, model, str(tmp_path))
  exported = load_file(tmp_path / "checkpoint" / "model.safetensors")
  assert sorted(exported) == sorted(k for k in state if not k.startswith(UNUSED))
  for name, value in exported.items():
    np.testing.assert_array_equal(value, state[name], err_msg=name)
  config = json.loads((tmp_path / "checkpoint" / "config.json").read_text())
  assert (config["cross_compute_hidden_size"], config["num_hidden_layers"]) == (CROSS, LAYERS)
  assert config["cross_image_size"] == CROSS_IMAGE
  assert {k: config["vision_config"][k] for k in VISION} == VISION


def test_command_line_import(release, tmp_path, capsys):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from vlm_jax.cli import convert as cli  # pylint: disable=g-import-not-at-top
  state, path = release
  cli.main(["import", path, "--layout", "cogagent", "--out", str(tmp_path / "p")])
  assert "keep their initialisation" not in capsys.readouterr().out
  with ocp.StandardCheckpointer() as reader:
    params = reader.restore(tmp_path / "p")
  np.testing.assert_array_equal(params["lm"]["embed"]["embedding"],
                                state["model.embed_tokens.weight"])
  np.testing.assert_array_equal(params["high_res"]["cls"], state[f"{HIGH}cls_token"].reshape(-1))
