"""Prismer's released checkpoints <-> `vlm_jax.models.prismer.Prismer`.

A release (huggingface.co/shikunl/prismer, `<task>_<model>/pytorch_model.bin` for task in
pretrain/caption/vqa and model in prismer[z]_{base,large}, fetched by the repo's
`download_checkpoints.py`) is one source, `checkpoint`: the whole model's state dict
(`accelerator.save_state`), read with torch.load(weights_only=True). Names from
github.com/NVlabs/prismer model/modules/{vit,resampler,roberta,utils}.py:

    expert_encoder.conv1.rgb.weight                         vision/embedder/patch_embedding
    expert_encoder.conv1.<expert>.{1,4,7,10,13}.weight      vision/embedder/stem_<expert>/
        (the expert stem's convs; 0 is the resize, 3, 6, 9,     conv_{0..3}, proj
        12 the ReLUs)
    expert_encoder.conv1.<expert>.{2,5,8,11}.{weight, bias, vision/embedder/stem_<expert>/
        running_mean, running_var} (its BatchNorm2d)            norm_{0..3}/{scale, bias,
                                                                mean, var}
    expert_encoder.positional_embedding [hw, D]             vision/embedder/pos_embedding
    expert_encoder.instance_embedding [128, D]              vision/embedder/instance_embedding
    expert_encoder.resampler.latents                        vision/embedder/resampler/latents
    expert_encoder.resampler.perceiver_blocks.{j}.{attn.in_proj_*, attn.out_proj, ln_1 (the
        latents' norm), ln_2 (the inputs'), ln_ff, mlp.c_fc, mlp.c_proj}
                                                            .../resampler/layers_{j}/...
    expert_encoder.ln_pre / ln_post                         vision/pre_norm / encoder_norm
    expert_encoder.transformer.resblocks.{i}.0.{ln_1, attn.in_proj_weight, attn.in_proj_bias,
        attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}          vision/encoder/<stack>/...
    expert_encoder.transformer.resblocks.{i}.1.{adaptor.down_proj, adaptor.up_proj,
        adaptor_ln}                                         vision/encoder/<stack>/adaptor/...
    text_decoder.roberta.embeddings.{word_embeddings, position_embeddings,
        token_type_embeddings, LayerNorm, position_ids}     word_embedding, pos_embedding,
                                                            token_type_embedding, embed_norm
    text_decoder.roberta.encoder.layer.{i}.0.{attention.self.{query,key,value},
        attention.output.{dense,LayerNorm}, intermediate.dense, output.{dense,LayerNorm}}
                                                            decoder/<stack>/self_attention,
                                                            self_attention_norm, mlp, mlp_norm
    text_decoder.roberta.encoder.layer.{i}.1.{self.{query,key,value}, output.{dense,
        LayerNorm}}                                         decoder/<stack>/cross_attention(_norm)
    text_decoder.roberta.encoder.layer.{i}.2.{adaptor.down_proj, adaptor.up_proj, adaptor_ln}
                                                            decoder/<stack>/adaptor
    text_decoder.roberta.encoder.output_layer.*             output_layer/...
    text_decoder.lm_head.{dense, layer_norm, bias}          lm_head_dense, lm_head_norm,
                                                            lm_head_bias

The state dict also lists the tied copies `lm_head.decoder.weight` (the word embeddings) and
`lm_head.decoder.bias` (= lm_head.bias) and the `position_ids` buffer (0..513): ignored on
import, written back on export. Expert stems (prismer_*; PrismerZ, prismerz_*, is RGB only):
Prismer's BatchNorms become our stems with `vision.expert_stem_norm='batch'` (set by
`model_config`; BatchNorm with its running statistics frozen, nn/norms.py FrozenBatchNorm),
so a model whose stems normalise with LayerNorm (the default) is refused both ways with that
reason. Each BatchNorm's `num_batches_tracked` (a count of training batches, unused by
BatchNorm's fixed momentum) is ignored on import and written back as 0 on export.
Heads are width / 64 (RoBERTa base/large; Prismer's `load_encoder` uses width // 64 for the
ViT too); the resampler has 8 heads (hard-coded in the reference).
"""
import re

import jax.numpy as jnp
import numpy as np

from vlm_jax.convert import released
from vlm_jax.convert import rules as R
from vlm_jax.convert.checkpoint import ConversionError
from vlm_jax.nn import expert_vit

NAME = "prismer"
FAMILY = "prismer"
SOURCES = ("checkpoint",)
HEAD_DIM = 64
RESAMPLER_HEADS = 8
STEM_CONVS = (1, 4, 7, 10)  # Sequential indices of the stem's 3x3 convs; 13 is the 1x1
STEM_NORMS = (2, 5, 8, 11)  # ... and of its BatchNorm2d layers
_V, _T = "expert_encoder.", "text_decoder."
_QKV = ("query", "key", "value")


def _in_proj(ours: str, hf: str) -> list[R.Rule]:
  """torch MultiheadAttention (in_proj_weight [q; k; v], in_proj_bias, out_proj)."""
  return [R.fused(tuple(f"{ours}/{n}/kernel" for n in _QKV), f"{hf}.in_proj_weight"),
          R.fused_vector(tuple(f"{ours}/{n}/bias" for n in _QKV), f"{hf}.in_proj_bias"),
          *R.linear(f"{ours}/out", f"{hf}.out_proj", in_axes=2)]


def _adaptor(ours: str, hf: str) -> list[R.Rule]:
  return [*R.linear(f"{ours}/down", f"{hf}.adaptor.down_proj"),
          *R.linear(f"{ours}/up", f"{hf}.adaptor.up_proj"),
          *R.layer_norm(f"{ours}/norm", f"{hf}.adaptor_ln")]


def _roberta_attention(ours: str, norm: str, hf: str) -> list[R.Rule]:
  """RobertaAttention: self.{query,key,value}, output.dense, output.LayerNorm (post-LN)."""
  return [*(r for n in _QKV for r in R.linear(f"{ours}/{n}", f"{hf}.self.{n}")),
          *R.linear(f"{ours}/out", f"{hf}.output.dense", in_axes=2),
          *R.layer_norm(norm, f"{hf}.output.LayerNorm")]


def _roberta_layer(prefix: str, hf: str) -> list[R.Rule]:
  """RobertaLayer: attention, intermediate.dense, output.{dense,LayerNorm}."""
  return [*_roberta_attention(f"{prefix}self_attention", f"{prefix}self_attention_norm",
                              f"{hf}.attention"),
          *R.linear(f"{prefix}mlp/wi", f"{hf}.intermediate.dense"),
          *R.linear(f"{prefix}mlp/wo", f"{hf}.output.dense"),
          *R.layer_norm(f"{prefix}mlp_norm", f"{hf}.output.LayerNorm")]


_L = _T + "roberta.encoder.layer.{i}"
DECODER_LAYER = [
    *_roberta_layer("", f"{_L}.0"),
    *_roberta_attention("cross_attention", "cross_attention_norm", f"{_L}.1"),
    *_adaptor("adaptor", f"{_L}.2"),
]
_B = _V + "transformer.resblocks.{i}"
VISION_LAYER = [
    *R.layer_norm("pre_attention_norm", f"{_B}.0.ln_1"),
    *_in_proj("self_attention", f"{_B}.0.attn"),
    *R.layer_norm("pre_mlp_norm", f"{_B}.0.ln_2"),
    *R.linear("mlp/wi", f"{_B}.0.mlp.c_fc"), *R.linear("mlp/wo", f"{_B}.0.mlp.c_proj"),
    *_adaptor("adaptor", f"{_B}.1"),
]


def _with_copies(target: str, source: str, copies: tuple[str, ...] = (),
                 buffers: dict | None = None) -> R.Rule:
  """`source` <-> our `target`; export also writes it to `copies` (its tied duplicates in the
  state dict) and `buffers` (name -> fn(ours), e.g. position_ids)."""
  buffers = buffers or {}
  return R.Rule((target,), (source, *copies, *buffers),
                lambda w, *_, shapes: (w.reshape(shapes[0]),),
                lambda x: (x,) * (1 + len(copies)) + tuple(f(x) for f in buffers.values()))


def _position_ids(table):
  return np.arange(table.shape[0], dtype=np.int64)[None]


def _text_rules(exporting: bool) -> list[R.Rule]:
  """Import reads each tensor once; export also writes the tied copies and position_ids."""
  emb = _T + "roberta.embeddings."
  copy = lambda name: (name,) if exporting else ()
  return [_with_copies("word_embedding", emb + "word_embeddings.weight",
                       copy(_T + "lm_head.decoder.weight")),
          _with_copies("pos_embedding/pos_embedding", emb + "position_embeddings.weight",
                       buffers={emb + "position_ids": _position_ids} if exporting else None),
          R.Rule(("token_type_embedding",), (emb + "token_type_embeddings.weight",),
                 lambda w, shapes: (w.reshape(shapes[0]),), lambda x: (x.reshape(1, -1),)),
          *R.layer_norm("embed_norm", emb + "LayerNorm"),
          *_roberta_layer("output_layer/", _T + "roberta.encoder.output_layer"),
          *R.linear("lm_head_dense", _T + "lm_head.dense"),
          *R.layer_norm("lm_head_norm", _T + "lm_head.layer_norm"),
          _with_copies("lm_head_bias", _T + "lm_head.bias", copy(_T + "lm_head.decoder.bias"))]


def _stem_norm(ours: str, hf: str, exporting: bool) -> list[R.Rule]:
  """BatchNorm2d `hf` <-> FrozenBatchNorm `ours`; export also writes num_batches_tracked."""
  count = {hf + ".num_batches_tracked": lambda _: np.zeros((), np.int64)} if exporting else None
  return [*R.layer_norm(ours, hf), R.copy(ours + "/mean", hf + ".running_mean"),
          _with_copies(ours + "/var", hf + ".running_var", buffers=count)]


def _vision_rules(paths: dict, exporting: bool) -> list[R.Rule]:
  e = "vision/embedder/"
  rules = [R.conv(e + "patch_embedding/kernel", _V + "conv1.rgb.weight"),
           R.Rule((e + "pos_embedding/pos_embedding",), (_V + "positional_embedding",),
                  lambda w, shapes: (w.reshape(shapes[0]),),
                  lambda p: (p.reshape(-1, p.shape[-1]),)),
           *R.layer_norm("vision/pre_norm", _V + "ln_pre"),
           *R.layer_norm("vision/encoder_norm", _V + "ln_post")]
  if e + "instance_embedding" in paths:
    rules.append(R.copy(e + "instance_embedding", _V + "instance_embedding"))
  for expert in _experts(paths):
    stem, hf = f"{e}stem_{expert}/", f"{_V}conv1.{expert}."
    rules += [R.conv(f"{stem}conv_{k}/kernel", f"{hf}{index}.weight")
              for k, index in enumerate(STEM_CONVS)]
    rules += [r for k, index in enumerate(STEM_NORMS)
              for r in _stem_norm(f"{stem}norm_{k}", f"{hf}{index}", exporting)]
    rules.append(R.conv(f"{stem}proj/kernel", f"{hf}13.weight"))
  if e + "resampler/latents" in paths:
    rules.append(R.copy(e + "resampler/latents", _V + "resampler.latents"))
  for j in _indices(paths, rf"{e}resampler/layers_(\d+)/"):
    ours, hf = f"{e}resampler/layers_{j}/", f"{_V}resampler.perceiver_blocks.{j}"
    rules += [*_in_proj(ours + "attention", hf + ".attn"),
              *R.layer_norm(ours + "latents_norm", hf + ".ln_1"),
              *R.layer_norm(ours + "inputs_norm", hf + ".ln_2"),
              *R.layer_norm(ours + "mlp_norm", hf + ".ln_ff"),
              *R.linear(ours + "mlp/wi", hf + ".mlp.c_fc"),
              *R.linear(ours + "mlp/wo", hf + ".mlp.c_proj")]
  return rules


def _indices(items, pattern: str) -> list[int]:
  return sorted({int(m.group(1)) for p in items if (m := re.match(pattern, p))})


def _experts(paths: dict) -> list[str]:
  return sorted({m.group(1) for p in paths
                 if (m := re.match(r"vision/embedder/stem_(\w+?)/", p))})


def layout(model, checkpoint=None) -> released.Layout:
  """Rules between `model`'s parameters and the checkpoint (None: export)."""
  vision = model.vision
  if vision.experts and vision.expert_stem_norm != "batch":
    raise ConversionError(
        f"{checkpoint.source if checkpoint is not None else 'export'}: Prismer's expert stems "
        f"normalise with BatchNorm, the model's (experts {tuple(vision.experts)}) with "
        f"expert_stem_norm={vision.expert_stem_norm!r}; build it with "
        "config.model.vision.expert_stem_norm='batch' (configs/prismer.py option "
        "stem_norm=batch).")

  def slots(paths, names):
    exporting = names is None
    rules = _text_rules(exporting) + _vision_rules(paths, exporting)
    out = R.expand(paths, rules, [("decoder", DECODER_LAYER), ("vision/encoder", VISION_LAYER)])
    return R.under(out, "", "checkpoint:")
  # Tied duplicates and a buffer: read with the tensor they copy, written back on export.
  ignore = tuple(re.escape("checkpoint:" + _T + n) for n in (
      "lm_head.decoder.weight", "lm_head.decoder.bias", "roberta.embeddings.position_ids"))
  ignore += (re.escape(f"checkpoint:{_V}conv1.") + r"\w+\.\d+\.num_batches_tracked",)
  return released.Layout(NAME, ignore, slots)


def model_config(checkpoint) -> dict:
  """config.model's Prismer fields with the checkpoint's shapes."""
  names = set(checkpoint.tensors)
  shape = lambda name: checkpoint.shape("checkpoint:" + name)
  vocab, width = shape(_T + "roberta.embeddings.word_embeddings.weight")
  vision_width, _, patch, _ = shape(_V + "conv1.rgb.weight")
  experts = tuple(e for e in expert_vit.EXPERTS
                  if f"checkpoint:{_V}conv1.{e}.1.weight" in names)
  lm = dict(vocab_size=vocab, width=width, num_heads=width // HEAD_DIM,
            num_layers=len(_indices(names, rf"checkpoint:{re.escape(_L[:-4])}\.(\d+)\.")),
            mlp_dim=shape(_L.format(i=0) + ".0.intermediate.dense.weight")[0],
            max_text_length=shape(_T + "roberta.embeddings.position_embeddings.weight")[0])
  vision = dict(
      width=vision_width, num_heads=vision_width // HEAD_DIM, patch_size=patch,
      depth=len(_indices(names, rf"checkpoint:{re.escape(_B[:-4])}\.(\d+)\.")),
      mlp_dim=shape(_B.format(i=0) + ".0.mlp.c_fc.weight")[0],
      image_size=round(shape(_V + "positional_embedding")[0] ** 0.5) * patch, experts=experts)
  if experts:
    vision.update(expert_stem_norm="batch", num_latents=shape(_V + "resampler.latents")[0],
                  resampler_heads=RESAMPLER_HEADS,
                  resampler_layers=len(_indices(
                      names, rf"checkpoint:{re.escape(_V)}resampler\.perceiver_blocks\.(\d+)\.")))
  return dict(name=FAMILY, lm=lm, vision=vision, freeze="none", dropout_rate=0.0,
              adaptor_ratio=width // shape(_L.format(i=0) + ".2.adaptor.down_proj.weight")[0])


def example_batch(checkpoint, model) -> dict:
  size = model.vision.image_size
  batch = {"images": jnp.zeros((1, 1, size, size, 3)), "tokens": jnp.zeros((1, 2), jnp.int32),
           "loss_mask": jnp.ones((1, 2))}
  for expert in model.vision.experts:
    channels = checkpoint.shape(f"checkpoint:{_V}conv1.{expert}.1.weight")[1]
    batch[expert_vit.expert_key(expert)] = jnp.zeros((1, size, size, channels))
  if "obj_detection" in model.vision.experts:
    batch[expert_vit.INSTANCES_KEY] = jnp.zeros((1, size, size), jnp.int32)
  return batch


def hf_configs(model, params) -> dict:
  """The release has no config.json (the repo's configs/prismer.json holds the sizes)."""
  del model, params
  return {}
