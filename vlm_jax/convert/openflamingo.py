"""OpenFlamingo's released checkpoints <-> `vlm_jax.models.flamingo.Flamingo`.

A release (huggingface.co/openflamingo/OpenFlamingo-{4B-vitl-rpj3b,9B-vitl-mpt7b}
[-langinstruct], the deprecated LLaMA OpenFlamingo-9B; OpenFlamingo-3B's MPT-1B is MosaicGPT
with QK LayerNorm, which we do not have: its LM is refused) is three sources:

    checkpoint  `checkpoint.pt`: the trainable part, a flat state dict (read with
                torch.load(weights_only=True)), as open_flamingo's
                `filter_state_dict_to_trainable` leaves it:
        perceiver.latents, perceiver.layers.{j}.0.{norm_media,norm_latents,to_q,to_kv,
            to_out}, perceiver.layers.{j}.1.{0,1,3} (LN, Linear, Linear), perceiver.norm
                                                        -> resampler/...
        lang_encoder.<decoder layers>.{i}.gated_cross_attn_layer.{attn_gate,ff_gate,
            attn.norm,attn.to_q,attn.to_kv,attn.to_out,ff.0,ff.1,ff.3}
                                                        -> lm/<unit>/xattn_k/... (OpenFlamingo
            layer i = unit i // g, k = i % g); the deprecated LLaMA release names them
            lang_encoder.gated_cross_attn_layers.{i}.* (duplicates of the same tensors
            when both are present: the second copy is ignored)
        lang_encoder.<input embedding> (the whole table, trained; `<image>` and
            `<|endofchunk|>` rows included)     -> lm/embed/embedding and, rows
            new_token_ids, new_token_embedding
        lang_encoder.embed_out.weight (GPT-NeoX: kept by the filter, "embed" is in its
            name)                              -> lm/logits_projection/kernel
        lang_encoder.lm_head.weight of a tied LM (transformers' MPT lists the table twice):
            ignored
    lm          the language model's HF directory (MPT-7B, RedPajama-INCITE-3B (GPT-NeoX),
                LLaMA): every layer, the final norm, an untied head (LLaMA) -> lm/...;
                its own embedding (pre-training, not resized) is ignored: the checkpoint's
                trained table replaces it, as `model.load_state_dict(checkpoint)` does
    vision      open_clip ViT-L/14 ('openai'): `open_clip_pytorch_model.bin` /
                `open_clip_model.safetensors` (`visual.*`, convert/open_clip.py) -> vision/...

Decoder layers are `transformer.blocks` (MPT), `gpt_neox.layers`, `model.layers` (LLaMA),
as open_flamingo's `_infer_decoder_layers_attr_name`.

Embedding. OpenFlamingo trains the whole input embedding (resized to len(tokenizer)); we
train only the rows of the added tokens (models/flamingo.py). Import puts the trained table
in the frozen `lm/embed/embedding` (so every row, and MPT's tied output projection, is
OpenFlamingo's) and copies its `<image>` / `<|endofchunk|>` rows into
`new_token_embedding`; export writes the table with those rows taken from
`new_token_embedding` (the ones we train). An untied head the checkpoint lacks (LLaMA:
frozen, its name has no "embed") comes from the LM with the rows of the added tokens set to
zero: OpenFlamingo leaves them at a random initialisation after `resize_token_embeddings`.

Vision. OpenFlamingo's resampler reads open_clip's token output, which before open_clip
2.23 is the last layer's output without `ln_post`: the model is built with
`vision.post_norm='class'`. The image-text projection `visual.proj` is not used.
Heads: OpenFlamingo's perceiver and gated blocks use dim_head 64 and open_clip's ViTs head
width 64, so head counts are widths / 64. Token ids of `<image>` and `<|endofchunk|>`
default to V-2 and V-3 of the V-row table (open_flamingo adds `<|endofchunk|>`, `<image>`,
then `<PAD>` to a tokenizer without a pad token); pass new_token_ids=(image, eoc)
otherwise.
"""
import re

import jax.numpy as jnp
import numpy as np

from vlm_jax.convert import gpt_neox, llama, mpt, open_clip, released, transfer
from vlm_jax.convert import rules as R
from vlm_jax.convert.checkpoint import ConversionError
from vlm_jax.models import flamingo

NAME = "openflamingo"
FAMILY = "flamingo"
SOURCES = ("checkpoint", "lm", "vision")
LM_ARCHS = {m.NAME: m for m in (mpt, gpt_neox, llama)}
DECODER_LAYERS = {"mpt": "transformer.blocks", "gpt_neox": "gpt_neox.layers",
                  "llama": "model.layers"}
V1_BLOCKS = "lang_encoder.gated_cross_attn_layers"
HEAD_DIM = 64
EMBED, HEAD = "embed/embedding", "logits_projection/kernel"
# The LM's input embedding and untied head (None: tied) in each HF layout.
LM_TABLES = {"mpt": ("transformer.wte.weight", None),
             "gpt_neox": ("gpt_neox.embed_in.weight", "embed_out.weight"),
             "llama": ("model.embed_tokens.weight", "lm_head.weight")}
# Buffers older transformers saved inside decoder layers (kept by the trainable filter).
BUFFERS = r"checkpoint:lang_encoder\..*\.(rotary_emb\.inv_freq|attention\.(bias|masked_bias))"


def _attention(ours, hf):
  """OpenFlamingo's to_q / to_kv ([k; v]) / to_out, no biases."""
  return [R.dense(f"{ours}/query/kernel", f"{hf}.to_q.weight"),
          R.fused((f"{ours}/key/kernel", f"{ours}/value/kernel"), f"{hf}.to_kv.weight"),
          R.dense(f"{ours}/out/kernel", f"{hf}.to_out.weight", in_axes=2)]


def _feed_forward(ours, hf):
  """FeedForward = Sequential(LayerNorm, Linear, GELU, Linear): indices 0, 1, 3."""
  return [*R.layer_norm(f"{ours}mlp_norm", f"{hf}.0"),
          R.dense(f"{ours}mlp/wi/kernel", f"{hf}.1.weight"),
          R.dense(f"{ours}mlp/wo/kernel", f"{hf}.3.weight")]


GATED = [R.vector("attn_gate", "{p}attn_gate"), R.vector("ff_gate", "{p}ff_gate"),
         *R.layer_norm("attention_norm", "{p}attn.norm"), *_attention("attention", "{p}attn"),
         *_feed_forward("", "{p}ff")]


def _resampler_rules(paths: dict) -> list[R.Rule]:
  rules = [R.copy("resampler/latents", "perceiver.latents"),
           *R.layer_norm("resampler/final_norm", "perceiver.norm")]
  if "resampler/time_embedding" in paths:
    rules.append(R.copy("resampler/time_embedding", "perceiver.frame_embs"))
  for j in _indices(paths, r"resampler/layers_(\d+)/"):
    ours, hf = f"resampler/layers_{j}/", f"perceiver.layers.{j}"
    rules += [*R.layer_norm(f"{ours}inputs_norm", f"{hf}.0.norm_media"),
              *R.layer_norm(f"{ours}latents_norm", f"{hf}.0.norm_latents"),
              *_attention(f"{ours}attention", f"{hf}.0"), *_feed_forward(ours, f"{hf}.1")]
  return rules


def _indices(items, pattern: str) -> list[int]:
  return sorted({int(m.group(1)) for p in items if (m := re.match(pattern, p))})


def _blocks_pattern(layers: str) -> str:
  return rf"checkpoint:{re.escape(layers)}\.(\d+)\.gated_cross_attn_layer\."


def _gated_slots(paths: dict, block: str) -> list[R.Slot]:
  """OpenFlamingo's layer i block (`block` formatted with i) <-> our unit i // g's
  xattn_{i % g}, scanned or not."""
  slots = []
  for i, (prefix, index) in enumerate(R.stack_slots(R.subtree(paths, "lm/"), "layers")):
    unit, sublayer = prefix.rsplit("/", 1)
    ours = f"lm/{unit}/xattn_{sublayer.split('_')[1]}"
    if any(p.startswith(ours + "/") for p in paths):
      hf = "checkpoint:" + block.format(i=i) + "."
      slots += [R.Slot(r, tuple(f"{ours}/{t}" for t in r.targets), index,
                       tuple(s.format(p=hf) for s in r.sources)) for r in GATED]
  return slots


def _table(ids, count: int) -> R.Rule:
  """The checkpoint's trained table -> (embed/embedding, new_token_embedding rows `ids`);
  export writes it to `count` names (the checkpoint's and the LM's)."""
  ids = np.asarray(ids)

  def to_ours(table, *copies, shapes):
    del copies, shapes
    return table, table[ids]

  def to_hf(table, new_rows):
    return (jnp.asarray(table).at[ids].set(new_rows),) * count
  return R.Rule(("lm/" + EMBED, "new_token_embedding"), (), to_ours, to_hf)


def _lm_head(rows: int | None) -> R.Rule:
  """An untied head from the LM checkpoint ([V_lm, D]) <-> our [D, V]: rows beyond V_lm
  (the added tokens) are zero; `rows` is V_lm on import (None: export all of ours)."""
  def to_ours(w, shapes):
    vocab = shapes[0][1]
    w = w[:vocab]
    return (jnp.pad(w, ((0, vocab - w.shape[0]), (0, 0))).T,)

  def to_hf(kernel):
    w = kernel.T
    if rows is None:
      return (w,)
    return (jnp.pad(w, ((0, max(0, rows - w.shape[0])), (0, 0)))[:rows],)
  return R.Rule(("lm/" + HEAD,), (), to_ours, to_hf)


def lm_arch(model):
  """The HF architecture of a Flamingo model's LM (MPT, GPT-NeoX or LLaMA layout)."""
  if model.lm.position == "alibi":
    return mpt
  return llama if model.lm.norm_type == "rmsnorm" else gpt_neox


def _copies(target: str, count: int) -> R.Rule:
  """A Linear weight [out, in] <-> our kernel, written to `count` names on export."""
  return R.Rule((target,), (), lambda w, *copies, shapes: (w.T.reshape(shapes[0]),),
                lambda k: (k.T,) * count)


def layout(model, checkpoint=None) -> released.Layout:
  """Rules between `model`'s parameters and the three sources of `checkpoint` (a
  `sources.Combined`; None: export)."""
  arch = lm_arch(model)
  embed, head = LM_TABLES[arch.NAME]
  names = None if checkpoint is None else set(checkpoint.tensors)
  layers = f"lang_encoder.{DECODER_LAYERS[arch.NAME]}"
  blocks = layers + ".{i}.gated_cross_attn_layer"
  if names is not None and not _indices(names, _blocks_pattern(layers)):
    blocks = V1_BLOCKS + ".{i}"  # the deprecated LLaMA release's names
  trained = "checkpoint:lang_encoder."
  # open_flamingo's filter keeps a frozen head only when "embed" is in its name (GPT-NeoX's
  # embed_out); on import, whatever the file holds.
  head_in_checkpoint = head is not None and (
      "embed" in head if names is None else trained + head in names)
  exporting = names is None

  def slots(paths, names):
    lm_slots = arch.slots(R.subtree(paths, "lm/"), R.subtree(names, "lm:"))
    out = R.under([s for s in lm_slots if s.targets[0] not in (EMBED, HEAD)], "lm/", "lm:")
    out += R.under(open_clip.slots(R.subtree(paths, "vision/"), R.subtree(names, "vision:")),
                   "vision/", "vision:")
    out += R.under(R.expand(paths, _resampler_rules(paths), []), "", "checkpoint:")
    out += _gated_slots(paths, blocks)
    table = (trained + embed,) + (("lm:" + embed,) if exporting else ())
    rule = _table(model.new_token_ids, len(table))
    out.append(R.Slot(rule, rule.targets, None, table))
    if "lm/" + HEAD in paths:
      if head_in_checkpoint:  # GPT-NeoX's embed_out, trained copy in the checkpoint
        copies = (trained + head,) + (("lm:" + head,) if exporting else ())
        rule = _copies("lm/" + HEAD, len(copies))
      else:  # LLaMA's lm_head: only in the LM checkpoint, not resized
        copies = ("lm:" + head,)
        rule = _lm_head(None if exporting else checkpoint.shape("lm:" + head)[0])
      out.append(R.Slot(rule, rule.targets, None, copies))
    return out

  ignore = (*("lm:" + p for p in arch.IGNORE), *("vision:" + p for p in open_clip.IGNORE),
            BUFFERS, re.escape("checkpoint:" + V1_BLOCKS) + r"\..*",
            # replaced by the checkpoint's trained copies (see the module docstring)
            re.escape("lm:" + embed), *((re.escape("lm:" + head),) if head_in_checkpoint else ()),
            # a tied LM's state dict also lists the embedding as its output projection
            *((r"checkpoint:lang_encoder\.lm_head\.weight",) if model.lm.tie_embeddings else ()))
  return released.Layout(NAME, ignore, slots)


def _count(names, pattern: str) -> int:
  return len(_indices(names, pattern))


def model_config(checkpoint) -> dict:
  """config.model's Flamingo fields with the hyperparameters of the release's three sources
  (override new_token_ids when the tokenizer's added ids differ, see the module docstring)."""
  names = set(checkpoint.tensors)
  lm_config = checkpoint.config("lm")
  arch = next((m for m in LM_ARCHS.values() if lm_config.get("model_type") in m.MODEL_TYPES),
              None)
  if arch is None:
    raise ConversionError(f"{NAME}: the LM's model_type={lm_config.get('model_type')!r} is not "
                          f"one of OpenFlamingo's layouts we read ({sorted(LM_ARCHS)}).")
  lm = arch.module_kwargs(lm_config)
  embed = "checkpoint:lang_encoder." + LM_TABLES[arch.NAME][0]
  if embed not in names:
    raise ConversionError(f"{NAME}: {checkpoint.parts['checkpoint'].source} has no {embed[11:]} "
                          f"(the trained input embedding of a {arch.NAME} LM).")
  vocab = checkpoint.shape(embed)[0]
  lm["vocab_size"] = vocab

  visual = _visual_prefix(names)
  width, _, patch, _ = checkpoint.shape(visual + "conv1.weight")
  layers = f"lang_encoder.{DECODER_LAYERS[arch.NAME]}"
  blocks = _indices(names, _blocks_pattern(layers))
  blocks = blocks or _indices(names, rf"checkpoint:{re.escape(V1_BLOCKS)}\.(\d+)\.")
  interval = blocks[0] + 1 if blocks else 0
  if not blocks or blocks != list(range(interval - 1, lm["num_layers"], interval)):
    raise ConversionError(f"{NAME}: gated blocks at LM layers {blocks[:8]}: expected one before "
                          "every layer i with (i + 1) % interval == 0.")
  block = (f"checkpoint:{layers}.{interval - 1}.gated_cross_attn_layer."
           if f"checkpoint:{layers}.{interval - 1}.gated_cross_attn_layer.attn_gate" in names
           else f"checkpoint:{V1_BLOCKS}.{interval - 1}.")
  vision = dict(
      width=width, patch_size=patch, num_heads=width // HEAD_DIM,
      depth=_count(names, rf"{re.escape(visual)}transformer\.resblocks\.(\d+)\.ln_1\."),
      mlp_dim=checkpoint.shape(visual + "transformer.resblocks.0.mlp.c_fc.weight")[0],
      mlp_activation="quick_gelu", class_token=True, pre_norm=True, patch_bias=False,
      norm_epsilon=1e-5, post_norm="class")
  resampler = dict(
      num_layers=_count(names, r"checkpoint:perceiver\.layers\.(\d+)\.0\.to_q\."),
      num_latents=checkpoint.shape("checkpoint:perceiver.latents")[0],
      num_heads=checkpoint.shape("checkpoint:perceiver.layers.0.0.to_q.weight")[0] // HEAD_DIM,
      head_dim=HEAD_DIM, mlp_ratio=4, mlp_activation="gelu")
  if "checkpoint:perceiver.frame_embs" in names:
    resampler["num_frames"] = checkpoint.shape("checkpoint:perceiver.frame_embs")[0]
  xattn = dict(num_heads=checkpoint.shape(block + "attn.to_q.weight")[0] // HEAD_DIM,
               head_dim=HEAD_DIM, mlp_ratio=4, mlp_activation="gelu")
  group, sublayers = flamingo.openflamingo_placement(interval)
  return dict(name=FAMILY, lm=lm, vision=vision, resampler=resampler, xattn=xattn,
              xattn_group=group, xattn_sublayers=sublayers, only_attend_immediate=True,
              new_token_ids=(vocab - 2, vocab - 3))


def _visual_prefix(names) -> str:
  return "vision:" + (open_clip.PREFIX if any(n.startswith("vision:" + open_clip.PREFIX)
                                               for n in names) else "")


def example_batch(checkpoint, model) -> dict:
  grid = round((checkpoint.shape(_visual_prefix(checkpoint.tensors) + "positional_embedding")[0]
                - 1) ** 0.5)
  size = grid * model.vision.patch_size
  return {"images": jnp.zeros((1, 1, size, size, 3)), "image_mask": jnp.ones((1, 1)),
          "image_positions": jnp.zeros((1, 1), jnp.int32),
          "tokens": jnp.zeros((1, 2), jnp.int32), "token_mask": jnp.ones((1, 2))}


def hf_configs(model, params) -> dict:
  """config.json of the exported LM (the other sources have none)."""
  shapes = {p: tuple(a.shape) for p, a in R.subtree(transfer.flatten(params), "lm/").items()}
  return {"lm": lm_arch(model).hf_config(model.bind({"params": params}).lm, shapes)}
