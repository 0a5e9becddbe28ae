"""MiniGPT-v2's released checkpoint <-> `vlm_jax.models.minigpt_v2.MiniGPTv2`.

A release (github.com/Vision-CAIR/MiniGPT-4, README: `minigptv2_checkpoint.pth`, the
stage-3 chat model, and the stage-2 `minigptv2_stage2.pth`) is three sources:

    checkpoint  the `.pth` MiniGPT-4's runner saves (`{"model": state dict, ...}`, read with
                torch.load(weights_only=True)): the trainable parameters only
        llama_proj.{weight,bias} [D, 4*Dv]                  -> projection/{kernel,bias}
        llama_model.base_model.model.model.layers.{i}.self_attn.{q,v}_proj.
            lora_A.default.weight [r, D]                    -> lm/<stack>/self_attention/
            lora_B.default.weight [N*H, r]                     {query,value}/{lora_a,lora_b}
        (PEFT < 0.3 names them lora_A.weight / lora_B.weight: read too); rotary `inv_freq`
        buffers that transformers 4.30 saved are ignored
    lm          LLaMA-2-7B-chat in HF layout (convert/llama.py)      -> lm/...
    vision      EVA ViT-g `eva_vit_g.pth` (LAVIS, the file `create_eva_vit_g` downloads):
        cls_token [1, 1, Dv], pos_embed [1, 1+hw, Dv]       -> vision/cls, pos_embedding
        patch_embed.proj.{weight,bias}                      -> vision/patch_embedding
        blocks.{i}.norm1 / norm2                    -> <stack>/pre_attention_norm / pre_mlp_norm
        blocks.{i}.attn.qkv.weight [3Dv, Dv] ([q; k; v]), attn.q_bias, attn.v_bias
                                                    -> <stack>/self_attention/{query,key,value}/
                                                       {kernel,bias} (key bias 0)
        blocks.{i}.attn.proj, mlp.fc1, mlp.fc2      -> <stack>/self_attention/out, mlp/wi, mlp/wo
        MiniGPT-v2 (as BLIP-2) builds the ViT with one layer fewer than the file holds and
        loads it with strict=False: the last block is ignored (`vision.depth` = blocks - 1).

`ln_vision`, the LayerNorm after the ViT, is frozen at its initialisation (scale 1, bias 0)
and in none of the files: our `vision/encoder_norm` is set to that and not exported.
LoRA scale alpha / r: r is read from the tensors, alpha is not stored (MiniGPT-v2: 16;
override lm.lora_alpha). EVA ViT-g's heads (16 of width 88) cannot be read from shapes
either: vision.num_heads defaults to width / 88. The position embedding is imported at the
file's grid (224 px for eva_vit_g.pth; MiniGPT-v2 interpolates it to 448 px with torch's
bicubic, which we do not reproduce: import at the file's resolution and resize with
`embeddings.resize_2d_pos_embedding` if needed).
"""
import re

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.convert import llama, released, transfer
from vlm_jax.convert import rules as R
from vlm_jax.convert.checkpoint import ConversionError

NAME = "minigpt_v2"
FAMILY = "minigpt_v2"
SOURCES = ("checkpoint", "lm", "vision")
PEFT = "checkpoint:llama_model.base_model.model."
LORA_PROJ = {"query": "q_proj", "key": "k_proj", "value": "v_proj"}
EVA_HEAD_WIDTH = 88
LORA_ALPHA = 16.0  # MiniGPT-v2's configs (minigpt_v2.yaml): r 64, alpha 16


def _lora(target: str, adapter: str) -> list[R.Rule]:
  """PEFT's lora_A [r, D] / lora_B [N*H, r] <-> our lora_a [D, r] / lora_b [r, N, H]."""
  hf = f"model.layers.{{i}}.self_attn.{LORA_PROJ[target]}"
  ours = f"self_attention/{target}"
  return [R.Rule((f"{ours}/lora_a",), (f"{hf}.lora_A{adapter}.weight",),
                 lambda w, shapes: (w.T,), lambda a: (a.T,)),
          R.Rule((f"{ours}/lora_b",), (f"{hf}.lora_B{adapter}.weight",),
                 lambda w, shapes: (w.T.reshape(shapes[0]),),
                 lambda b: (b.reshape(b.shape[0], -1).T,))]


def _qv_bias(q, v, shapes):
  return q.reshape(shapes[0]), jnp.zeros(shapes[1], q.dtype), v.reshape(shapes[2])


def _qv_bias_to_hf(q, k, v):
  if not isinstance(k, jax.core.Tracer) and np.any(np.asarray(k)):
    raise ConversionError("EVA's attention has no key bias, but this ViT's is not zero.")
  return q.reshape(-1), v.reshape(-1)


_QKV = tuple(f"self_attention/{n}" for n in ("query", "key", "value"))
EVA_LAYER = [
    *R.layer_norm("pre_attention_norm", "blocks.{i}.norm1"),
    R.fused(tuple(f"{n}/kernel" for n in _QKV), "blocks.{i}.attn.qkv.weight"),
    R.Rule(tuple(f"{n}/bias" for n in _QKV), ("blocks.{i}.attn.q_bias", "blocks.{i}.attn.v_bias"),
           _qv_bias, _qv_bias_to_hf),
    *R.linear("self_attention/out", "blocks.{i}.attn.proj", in_axes=2),
    *R.layer_norm("pre_mlp_norm", "blocks.{i}.norm2"),
    *R.linear("mlp/wi", "blocks.{i}.mlp.fc1"),
    *R.linear("mlp/wo", "blocks.{i}.mlp.fc2"),
]
EVA_PLAIN = [
    R.conv("patch_embedding/kernel", "patch_embed.proj.weight"),
    R.vector("patch_embedding/bias", "patch_embed.proj.bias"),
    R.Rule(("cls",), ("cls_token",), lambda w, shapes: (w.reshape(shapes[0]),),
           lambda c: (c.reshape(1, 1, -1),)),
    R.Rule(("pos_embedding/pos_embedding",), ("pos_embed",),
           lambda w, shapes: (w.reshape(shapes[0]),), lambda p: (p[None],)),
    # ln_vision: frozen at nn.LayerNorm's initialisation, saved nowhere
    R.constant({"encoder_norm/scale": jnp.ones, "encoder_norm/bias": jnp.zeros}),
]


def _adapter(names) -> str:
  """PEFT >= 0.3 inserts the adapter name ('.default') in LoRA parameter names."""
  if names is None or any(".lora_A.default." in n for n in names):
    return ".default"
  return ""


def layout(model, checkpoint=None) -> released.Layout:
  """Rules between `model`'s parameters and the three sources (checkpoint None: export)."""
  names = None if checkpoint is None else set(checkpoint.tensors)
  adapter = _adapter(names)
  lora = [r for t in model.lm.lora_targets for r in _lora(t, adapter)]

  def slots(paths, names):
    lm_paths = R.subtree(paths, "lm/")
    out = R.under(llama.slots(lm_paths, R.subtree(names, "lm:")), "lm/", "lm:")
    out += R.under(R.expand(lm_paths, [], [("layers", lora)]), "lm/", PEFT)
    out += R.under(R.expand(paths, R.linear("projection", "llama_proj"), []), "",
                   "checkpoint:")
    out += R.under(R.expand(R.subtree(paths, "vision/"), EVA_PLAIN, [("encoder", EVA_LAYER)]),
                   "vision/", "vision:")
    return out

  ignore = (*("lm:" + p for p in llama.IGNORE),
            r"checkpoint:llama_model\..*\.rotary_emb\.inv_freq",  # transformers 4.30 buffers
            r"vision:blocks\.\d+\..*")  # blocks beyond the model's (the last, see above)
  return released.Layout(NAME, ignore, slots)


def model_config(checkpoint) -> dict:
  """config.model's MiniGPT-v2 fields with the hyperparameters of the three sources
  (override lm.lora_alpha, vision.num_heads where they differ, see the module docstring)."""
  names = set(checkpoint.tensors)
  lm = llama.module_kwargs(checkpoint.config("lm"))
  if lm.pop("tie_embeddings") or lm.pop("head_dim") != lm["width"] // lm["num_heads"]:
    raise ConversionError(f"{NAME}: MiniGPT-v2's LLaMA has an untied head and head_dim = "
                          "width / heads.")
  del lm["max_length"]
  targets = tuple(t for t, proj in LORA_PROJ.items()
                  if any(re.search(rf"\.{proj}\.lora_A(\.default)?\.weight$", n) for n in names))
  if not targets:
    raise ConversionError(f"{NAME}: {checkpoint.parts['checkpoint'].source} holds no LoRA "
                          "weights (…self_attn.q_proj.lora_A[.default].weight).")
  lora_a = next(n for n in names if f".{LORA_PROJ[targets[0]]}.lora_A" in n)
  lm.update(lora_targets=targets, lora_rank=checkpoint.shape(lora_a)[0], lora_alpha=LORA_ALPHA)
  width, _, patch, _ = checkpoint.shape("vision:patch_embed.proj.weight")
  blocks = len({m.group(1) for n in names if (m := re.match(r"vision:blocks\.(\d+)\.", n))})
  vision = dict(width=width, depth=blocks - 1, num_heads=width // EVA_HEAD_WIDTH,
                mlp_dim=checkpoint.shape("vision:blocks.0.mlp.fc1.weight")[0],
                patch_size=patch, class_token=True, mlp_activation="gelu")
  group = checkpoint.shape("checkpoint:llama_proj.weight")[1] // width
  return dict(name=FAMILY, lm=lm, vision=vision, group_size=group)


def example_batch(checkpoint, model) -> dict:
  grid = round((checkpoint.shape("vision:pos_embed")[1] - 1) ** 0.5)
  size = grid * model.vision.patch_size
  slots_per_image = grid * grid // model.group_size
  return {"images": jnp.zeros((1, 1, size, size, 3)), "image_mask": jnp.ones((1, 1)),
          "image_positions": jnp.zeros((1, 1), jnp.int32),
          "tokens": jnp.zeros((1, slots_per_image + 1), jnp.int32),
          "token_mask": jnp.ones((1, slots_per_image + 1))}


def hf_configs(model, params) -> dict:
  """config.json of the exported LLaMA (LoRA kept apart, as in the release)."""
  lm = model.bind({"params": params}).lm
  shapes = {p: tuple(a.shape) for p, a in R.subtree(transfer.flatten(params), "lm/").items()}
  return {"lm": llama.hf_config(lm, shapes)}
