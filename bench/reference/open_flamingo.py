"""open-flamingo's own train step at our Flamingo bench's sizes (PyTorch, CPU).

open_flamingo 2.0.1's `Flamingo` + `FlamingoLMMixin` around a random-init transformers
`MptForCausalLM` (the LM of OpenFlamingo-3B/9B) and `CLIPVisionModel` standing in for
open_clip's visual tower (same CLIP ViT: class token, ln_pre, quick-GELU, ln_post applied
to every token, class token dropped, as `vision_encoder.visual(x)[1]` with output_tokens).
Frozen as `open_flamingo/src/factory.py` freezes (everything, then the perceiver, the gated
cross-attention layers and the LM's input embeddings trainable), trained as
`open_flamingo/train/train_utils.py` and `train.py` train: loss from the LM's labels,
backward, input-embedding gradient masked to the `<image>` and `<|endofchunk|>` rows, global
gradient-norm clip 1.0, AdamW with weight decay on the gated cross-attention layers only.

The package `__init__` imports open_clip (not installed; open-flamingo pins torch 2.0.1),
so `open_flamingo/src` is loaded as a stand-alone package by path (DESIGN.md).
"""
import importlib.util
import os
import sys
import types

import numpy as np
import torch

from reference import hf_text


def _open_flamingo_src():
  """open_flamingo/src as the package `open_flamingo_src` (its modules import each other
  relatively), without running open_flamingo/__init__.py."""
  if "open_flamingo_src" in sys.modules:
    return sys.modules["open_flamingo_src"]
  spec = importlib.util.find_spec("open_flamingo")
  if spec is None:
    raise SystemExit("open-flamingo is not installed: pip install --no-deps "
                     "open-flamingo==2.0.1 einops-exts (setup.py [test])")
  src = os.path.join(os.path.dirname(spec.origin), "src")
  package = types.ModuleType("open_flamingo_src")
  package.__path__ = [src]
  sys.modules["open_flamingo_src"] = package
  for name in ("utils", "helpers", "flamingo_lm", "flamingo"):
    module_spec = importlib.util.spec_from_file_location(f"open_flamingo_src.{name}",
                                                         os.path.join(src, f"{name}.py"))
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    setattr(package, name, module)
  return package


class ClipVisual(torch.nn.Module):
  """transformers CLIPVisionModel behaving as open_clip's `visual` with output_tokens=True:
  returns (pooled, tokens), both after ln_post, tokens without the class token."""

  def __init__(self, config):
    super().__init__()
    from transformers import CLIPVisionModel
    self.model = CLIPVisionModel(config)

  def forward(self, pixels):
    hidden = self.model(pixel_values=pixels).last_hidden_state
    hidden = self.model.post_layernorm(hidden)
    return hidden[:, 0], hidden[:, 1:]


def build(sizes: dict):
  """(model, optimizer, parameters to clip) at `sizes` (see vs_reference.pair_sizes)."""
  from transformers import CLIPVisionConfig, MptConfig, MptForCausalLM
  of = _open_flamingo_src()
  torch.manual_seed(0)
  lm = MptForCausalLM(MptConfig(
      d_model=sizes["width"], n_heads=sizes["num_heads"], n_layers=sizes["num_layers"],
      expansion_ratio=sizes["mlp_dim"] // sizes["width"], max_seq_len=sizes["length"],
      vocab_size=sizes["vocab_size"], no_bias=True, tie_word_embeddings=True))
  of.utils.extend_instance(lm, of.flamingo_lm.FlamingoLMMixin)
  lm.set_decoder_layers_attr_name("transformer.blocks")
  visual = ClipVisual(CLIPVisionConfig(
      hidden_size=sizes["vision_width"], intermediate_size=sizes["vision_mlp_dim"],
      num_hidden_layers=sizes["vision_layers"], num_attention_heads=sizes["vision_heads"],
      image_size=sizes["image_size"], patch_size=sizes["patch_size"],
      hidden_act="quick_gelu"))
  model = of.flamingo.Flamingo(
      types.SimpleNamespace(visual=visual), lm, eoc_token_id=sizes["chunk_token"],
      media_token_id=sizes["image_token"], vis_dim=sizes["vision_width"],
      cross_attn_every_n_layers=sizes["xattn_every"])
  model.perceiver = of.helpers.PerceiverResampler(
      dim=sizes["vision_width"], depth=sizes["resampler_layers"],
      dim_head=sizes["resampler_head_dim"], heads=sizes["resampler_heads"],
      num_latents=sizes["num_latents"])
  # factory.py: freeze everything, then unfreeze what OpenFlamingo trains.
  model.requires_grad_(False)
  model.perceiver.requires_grad_(True)
  model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
  model.lang_encoder.get_input_embeddings().requires_grad_(True)
  named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
  groups = [  # train.py: weight decay on the gated cross-attention layers only
      {"params": [p for n, p in named if "gated_cross_attn" in n],
       "weight_decay": sizes["weight_decay"]},
      {"params": [p for n, p in named if "gated_cross_attn" not in n], "weight_decay": 0.0}]
  optimizer = torch.optim.AdamW(groups, lr=sizes["learning_rate"],
                                betas=(sizes["b1"], sizes["b2"]), eps=sizes["eps"])
  model.train()
  return model, optimizer, [p for _, p in named]


def torch_batch(batch: dict) -> dict:
  """Our batch (numpy) -> open-flamingo's inputs (labels as `hf_text.shifted_labels`)."""
  images = torch.from_numpy(np.ascontiguousarray(
      batch["images"].transpose(0, 1, 4, 2, 3)))[:, :, None]  # [B, N, 1, C, H, W]
  tokens = torch.from_numpy(batch["tokens"].astype(np.int64))
  return {"vision_x": images, "lang_x": tokens,
          "attention_mask": torch.from_numpy(batch["token_mask"] > 0).long(),
          "labels": hf_text.shifted_labels(tokens, batch["loss_mask"])}


def make_step(sizes: dict, batch: dict):
  model, optimizer, trainable = build(sizes)
  inputs = torch_batch(batch)
  embeddings = model.lang_encoder.get_input_embeddings().weight
  keep_rows = torch.zeros_like(embeddings)
  keep_rows[[sizes["image_token"], sizes["chunk_token"]]] = 1.0

  def step():
    loss = model(**inputs)[0]
    loss.backward()
    embeddings.grad = embeddings.grad * keep_rows  # train_utils.py: only the new tokens
    torch.nn.utils.clip_grad_norm_(trainable, sizes["grad_clip_norm"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()

  counts = {"params_total": sum(p.numel() for p in model.parameters()),
            "params_trainable": sum(p.numel() for p in trainable)}
  return step, counts
