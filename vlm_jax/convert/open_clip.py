"""open_clip / OpenAI CLIP vision towers (`visual.*` of an open_clip `CLIP` state dict, or a
bare `VisionTransformer`'s) <-> `vlm_jax.nn.vit.ViT(class_token=True, pre_norm=True,
patch_bias=False, mlp_activation='quick_gelu', norm_epsilon=1e-5)`. OpenFlamingo's
ViT-L/14 (`ViT-L-14`, pretrained 'openai') is read in this layout.

    conv1.weight [D, C, p, p]                         patch_embedding/kernel [p, p, C, D]
    class_embedding [D]                               cls
    positional_embedding [1+hw, D]                    pos_embedding/pos_embedding
    ln_pre / ln_post                                  pre_norm / encoder_norm
    transformer.resblocks.{i}.ln_1 / ln_2             <stack>/pre_attention_norm, pre_mlp_norm
    transformer.resblocks.{i}.attn.in_proj_weight     <stack>/self_attention/{query,key,value}
        [3D, D] rows [q; k; v] (+ in_proj_bias)         /kernel (+ bias)
    transformer.resblocks.{i}.attn.out_proj           <stack>/self_attention/out
    transformer.resblocks.{i}.mlp.c_fc / c_proj       <stack>/mlp/wi / wo

`visual.proj` (the image-text projection) and the text tower of a full CLIP state dict are
not part of a vision encoder: ignored on import, not written on export. OpenAI's
checkpoints use QuickGELU (`ViT(mlp_activation='quick_gelu')`); LAION-trained open_clip
models use GELU. open_clip files carry no config.json: import them into a given target
(`load_part(..., arch='open_clip')`, or a released layout such as `openflamingo`).
"""
from vlm_jax.convert import rules as R

NAME = "open_clip"
MODEL_TYPES = ()
PREFIX = "visual."
TEXT_TOWER = (r"positional_embedding", r"text_projection", r"logit_scale", r"attn_mask",
              r"token_embedding\..*", r"transformer\..*", r"ln_final\..*",
              r"input_resolution", r"context_length", r"vocab_size")  # last 3: OpenAI's
IGNORE = (r"(visual\.)?proj", *TEXT_TOWER)


_QKV = tuple(f"self_attention/{n}" for n in ("query", "key", "value"))
_L = "transformer.resblocks.{i}"
LAYER = [
    *R.layer_norm("pre_attention_norm", f"{_L}.ln_1"),
    R.fused(tuple(f"{n}/kernel" for n in _QKV), f"{_L}.attn.in_proj_weight"),
    R.fused_vector(tuple(f"{n}/bias" for n in _QKV), f"{_L}.attn.in_proj_bias"),
    *R.linear("self_attention/out", f"{_L}.attn.out_proj", in_axes=2),
    *R.layer_norm("pre_mlp_norm", f"{_L}.ln_2"),
    *R.linear("mlp/wi", f"{_L}.mlp.c_fc"),
    *R.linear("mlp/wo", f"{_L}.mlp.c_proj"),
]
PLAIN = [R.conv("patch_embedding/kernel", "conv1.weight"), R.copy("cls", "class_embedding"),
         R.copy("pos_embedding/pos_embedding", "positional_embedding"),
         *R.layer_norm("pre_norm", "ln_pre"), *R.layer_norm("encoder_norm", "ln_post")]


def slots(paths: dict, names: set | None, prefix: str | None = None) -> list[R.Slot]:
  """`paths`: our ViT's leaf paths -> shapes; `names`: the checkpoint's tensors (None:
  export). `prefix` defaults to 'visual.' when the checkpoint's names have it (or when
  exporting), else ''."""
  if prefix is None:
    prefix = PREFIX if names is None or any(n.startswith(PREFIX) for n in names) else ""
  return R.expand(paths, R.prefixed(PLAIN, prefix), [("encoder", R.prefixed(LAYER, prefix))])
