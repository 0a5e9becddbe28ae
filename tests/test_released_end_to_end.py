"""Each released layout from the command line, as docs/weights.md tells a user: `vlm-convert
import <release files> --layout NAME --config C --workdir RUN` (files written at a tiny
size in the release's own layout), then `vlm-eval --config C --workdir RUN` of the family's
benchmarks on the fixtures of tests/data/benchmarks, one process each (2-process vlm-eval:
tests/test_family_benchmarks.py; MiniGPT-v2's release: tests/test_convert_cli.py):

    OpenFlamingo  checkpoint.pt + the MPT LM's HF directory + open_clip_pytorch_model.bin,
                  written by open-flamingo's own classes, and its GPT-NeoX BPE tokenizer
                  (--tokenizer)                             -> 2-shot VQA (RICES), COCO captions
    CogAgent      cogagent-chat-hf: model.safetensors + config.json -> VQA, RefCOCO
    PrismerZ      pytorch_model.bin                          -> COCO captions
    Prismer       pytorch_model.bin with BatchNorm expert stems, plus the experts' labels of
                  the images (--expert-labels)             -> COCO captions

Each run's step 0 holds the release's tensors, and each benchmark's written score is the one
recomputed from the generations vlm-eval prints.
"""
import json
import os

import jax
import numpy as np
import pytest
import torch
from PIL import Image

import test_convert_cogagent as cogagent_files
import test_convert_openflamingo as openflamingo_files
import test_convert_prismer as prismer_files
import test_vocab_releases
from test_family_benchmarks import HUMANS, REFCOCO_ARGS, VQA_ARGS, _printed_answers
from vlm_jax import params as state_lib
from vlm_jax.cli import convert as convert_cli
from vlm_jax.cli import eval as eval_cli
from vlm_jax.data.boxes import permille
from vlm_jax.evaluation import captions, grounding, vqa

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "data", "benchmarks")
COCO_ARGS = ["--coco-captions", os.path.join(FIXTURES, "coco_captions.json"),
             "--image-dir", os.path.join(FIXTURES, "vqa_images")]  # images 7 and 9
CONFIGS = {name: os.path.join(REPO, "configs", f"{name}.py") + ":" + arg for name, arg in (
    ("flamingo", "oftiny"), ("cogagent", "tiny,towers=release"),
    ("prismer", "tiny,experts=none"))}


def _import(files: list, layout: str, run, *overrides, config=None) -> None:
  convert_cli.main(["import", *files, "--layout", layout, "--config",
                    config or CONFIGS[layout_family(layout)], *overrides, "--workdir", str(run)])


def layout_family(layout: str) -> str:
  return {"openflamingo": "flamingo"}.get(layout, layout)


def _step0(run, path: str, like: np.ndarray) -> np.ndarray:
  saved, step = state_lib.read_checkpoint(str(run), {
      path: jax.ShapeDtypeStruct(like.shape, like.dtype)})
  assert step == 0
  return np.asarray(saved[path])


def _eval(family: str, run, capsys, *args, overrides=(), config=None) -> tuple[dict, list[str],
                                                                            str]:
  """(the scalars vlm-eval wrote, the generations it printed, its output)."""
  eval_cli.main(["--config", config or CONFIGS[family], *overrides, "--workdir", str(run),
                 "--num-samples", "8",
                 "--batch-size", "2", *args])
  printed = capsys.readouterr().out
  with open(run / "metrics.jsonl") as f:
    written = json.loads(f.readlines()[-1])
  return written, _printed_answers(printed), printed


def _check_vqa(written, generated, shots=0):
  assert written["eval/vqa/questions"] == 2 and written["eval/vqa/shots"] == shots
  assert written["eval/vqa/vqa_accuracy"] == pytest.approx(
      vqa.mean_vqa_accuracy(generated, HUMANS))


def _check_captions(written, generated):
  references = [["A cat on a mat.", "a cat"], ["a dog"]]  # images 7 and 9 of the fixture
  assert written["eval/coco_captions/images"] == 2
  assert written["eval/coco_captions/cider"] == pytest.approx(
      captions.cider(generated, references))


def test_openflamingo_release_imported_then_few_shot_vqa_and_captions(tmp_path, capsys):
  tokenizer = tmp_path / "tokenizer"  # the release's own: GPT-NeoX BPE + open_flamingo's
  ids = test_vocab_releases.write_gpt_neox_tokenizer(tokenizer).convert_tokens_to_ids
  image_id, eoc_id = ids("<image>"), ids("<|endofchunk|>")
  reference = openflamingo_files.open_flamingo_reference()
  _, paths, state, _ = openflamingo_files.write_release(
      reference, tmp_path, "mpt", 1, width=128, layers=2, lm_vocab=1021, vision=64,
      vision_layers=1, vision_heads=2, size=64, patch=16, image_id=image_id, eoc_id=eoc_id)
  run = tmp_path / "run"
  new_tokens = [f"--config.model.new_token_ids=({image_id},{eoc_id})"]
  _import([paths["checkpoint"], "--lm", paths["lm"], "--vision", paths["vision"],
           "--tokenizer", str(tokenizer)], "openflamingo", run, *new_tokens)
  latents = state["perceiver.latents"]
  np.testing.assert_array_equal(_step0(run, "resampler/latents", latents), latents)
  # 2 shots each, by RICES from a support pool given as OpenFlamingo's train split would be;
  # tokenized with the tokenizer the import recorded in the run (no vocab flag)
  written, generated, printed = _eval("flamingo", run, capsys, *VQA_ARGS, "--vqa-shots", "2",
                                      "--vqa-shots-from", *VQA_ARGS[1:6:2],
                                      "--vqa-shots-image-prefix", "COCO_val2014_",
                                      overrides=new_tokens)
  eos = ids("<|endoftext|>")
  assert (f"vocabulary {run}/tokenizer ({len(ids.__self__)} tokens, pad {ids('<PAD>')}, "
          f"eos {eos}, bos {eos}, unk {eos}, prompts start with [])") in printed
  _check_vqa(written, generated, shots=2)
  written, generated, _ = _eval("flamingo", run, capsys, *COCO_ARGS, overrides=new_tokens)
  _check_captions(written, generated)


def test_cogagent_release_imported_then_vqa_and_refcoco(tmp_path, capsys):
  release = tmp_path / "cogagent-chat-hf"
  release.mkdir()
  # configs/cogagent.py:tiny's sizes, 56 px (low-res) and 112 px (high-res) at patch 14
  vision = dict(cogagent_files.VISION, hidden_size=64, num_heads=4, intermediate_size=256,
                patch_size=14, image_size=56, num_positions=17)
  state = cogagent_files.write_release(release, d=128, heads=4, mlp=344, vocab=1024,
                                       layers=2, cross=32, cross_in=64, vision=vision,
                                       cross_image=112, cross_blocks=3, cross_mlp=256)
  run = tmp_path / "run"
  heads = ["--config.model.high_res.num_heads=1"]  # EVA-02's heads are 64 wide
  _import([str(release)], "cogagent", run, *heads)
  assert "keep their initialisation" not in capsys.readouterr().out
  for name, path in (("model.embed_tokens.weight", "lm/embed/embedding"),
                     ("model.vision.pos_embed", "vision/output_pos_embedding/pos_embedding"),
                     ("model.cross_vision.pos_embed",
                      "high_res/output_pos_embedding/pos_embedding")):
    np.testing.assert_array_equal(_step0(run, path, state[name]), state[name])
  written, generated, _ = _eval("cogagent", run, capsys, *VQA_ARGS, overrides=heads)
  _check_vqa(written, generated)
  written, generated, _ = _eval("cogagent", run, capsys, *REFCOCO_ARGS, overrides=heads)
  truths = [(100, 250, 400, 750)] * 2 + [(0, 0, 500, 500)]  # the fixture's boxes in 0..999
  assert written["eval/refcoco/expressions"] == 3
  assert written["eval/refcoco/iou@0.5"] == pytest.approx(
      grounding.iou_accuracy(generated, truths, permille))


@pytest.mark.parametrize("experts", ["", "depth+edge"])
def test_prismer_release_imported_then_captions(tmp_path, capsys, experts):
  """PrismerZ, and Prismer with experts: its BatchNorm stems import; depth's labels come from
  a directory as Prismer's expert scripts write them, edge is computed."""
  channels = {name: 1 for name in experts.split("+") if name}
  state = prismer_files._reference_state(channels, text=64, vision=64, layers=2, vocab=1024,
                                         positions=514, patch=8, size=64)
  torch.save(state, tmp_path / "pytorch_model.bin")
  run = tmp_path / "run"
  config = CONFIGS["prismer"].replace("experts=none", f"experts={experts},stem_norm=batch"
                                      if experts else "experts=none")
  latents = ["--config.model.vision.num_latents=8"] if experts else []  # as the state's
  _import([str(tmp_path / "pytorch_model.bin")], "prismer", run, *latents, config=config)
  table = state["text_decoder.roberta.embeddings.word_embeddings.weight"].numpy()
  np.testing.assert_array_equal(_step0(run, "word_embedding", table), table)
  labels = []
  if experts:
    variance = state["expert_encoder.conv1.depth.2.running_var"].numpy()
    np.testing.assert_array_equal(
        _step0(run, "vision/embedder/stem_depth/norm_0/var", variance), variance)
    (tmp_path / "labels" / "depth").mkdir(parents=True)
    for image_id in (7, 9):  # the captioned images of the fixture
      depth = np.random.default_rng(image_id).integers(0, 256, (48, 64), dtype=np.uint8)
      Image.fromarray(depth).save(tmp_path / "labels" / "depth" /
                                  f"COCO_val2014_{image_id:012d}.png")
    labels = ["--expert-labels", str(tmp_path / "labels")]
  written, generated, _ = _eval("prismer", run, capsys, *COCO_ARGS, *labels, config=config,
                                overrides=latents)
  _check_captions(written, generated)
