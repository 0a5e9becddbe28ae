"""Weight import/export between HF safetensors checkpoints and our parameter trees.

Python API (see docs/weights.md):

    from vlm_jax import convert
    module, params = convert.import_hf("path/to/llama")            # module built from config.json
    flat = convert.load_part("path/to/llama", target)               # into given shardings
    convert.export_hf(params, module, "out/dir")                    # LoRA merged, config.json
    model, params = convert.released.import_released(convert.openflamingo, {
        "checkpoint": "checkpoint.pt", "lm": "mpt-7b/", "vision": "open_clip_pytorch_model.bin"})

`target` maps '/'-paths (relative to the sub-tree being filled) to ShapeDtypeStructs whose
`sharding` is where each array lands. One module per source architecture holds the
name/shape mapping (`llama`, `gpt_neox`, `mpt`, `clip`, ...): NAME, MODEL_TYPES (config.json
`model_type`s it reads), IGNORE (checkpoint tensors dropped on purpose), `slots(paths,
names)`, `build(config)` and `hf_config(module, shapes)`. The seed systems' released
checkpoints (OpenFlamingo, MiniGPT-v2, Prismer, CogAgent: several files, torch pickles read
with weights_only=True) have one module each in RELEASES (see released.py).
"""
import json
import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax import storage
from vlm_jax.convert import clip, cogagent, gpt_neox, llama, minigpt_v2, mpt, open_clip
from vlm_jax.convert import openflamingo, prismer, released, roberta, sources, t5, transfer
from vlm_jax.convert.checkpoint import Checkpoint, ConversionError
from vlm_jax.convert.transfer import flatten, unflatten
from vlm_jax.nn import lora

ARCHS = {m.NAME: m for m in (llama, gpt_neox, mpt, clip, open_clip, roberta, t5)}
# The seed systems' released checkpoints (whole models from their published files).
RELEASES = {m.NAME: m for m in (openflamingo, minigpt_v2, prismer, cogagent)}
# Our parameters that no HF checkpoint has; they keep their initialisation on import.
ALWAYS_NEW = (r"(.*/)?lora_[ab]",)

__all__ = ["ARCHS", "RELEASES", "Checkpoint", "ConversionError", "arch_for", "plan",
           "load_part", "import_hf", "export_hf", "flatten", "unflatten", "released",
           "sources"]


def arch_for(checkpoint: Checkpoint, arch: str | None = None):
  """The architecture module named `arch`, else the one reading config.json's model_type."""
  if arch:
    if arch not in ARCHS:
      raise ConversionError(f"arch={arch!r}: expected one of {sorted(ARCHS)}.")
    return ARCHS[arch]
  model_type = checkpoint.config().get("model_type")
  for module in ARCHS.values():
    if model_type in module.MODEL_TYPES:
      return module
  known = sorted(t for m in ARCHS.values() for t in m.MODEL_TYPES)
  raise ConversionError(f"{checkpoint.directory}: model_type={model_type!r} is not one we "
                        f"import (known: {known}).")


def plan(path: str, target: Mapping, *, arch: str | None = None,
         new: tuple[str, ...] = ()) -> transfer.ImportPlan:
  """Opens and checks the checkpoint at `path` against `target`; nothing is read yet."""
  checkpoint = sources.open_checkpoint(path)
  return transfer.plan_import(checkpoint, arch_for(checkpoint, arch), target,
                              tuple(new) + ALWAYS_NEW)


def load_part(path: str, target: Mapping, *, arch: str | None = None,
              new: tuple[str, ...] = (), log=print) -> dict:
  """'/'-path -> jax.Array (in the target's sharding) for every parameter the checkpoint
  provides; declared-new ones are left out (they keep their initialisation)."""
  import_plan = plan(path, target, arch=arch, new=new)
  with import_plan.checkpoint:
    loaded = dict(transfer.load(import_plan))
  log(f"Imported {transfer.describe(import_plan)}")
  return loaded


def import_hf(path: str, *, arch: str | None = None, dtype: str = "float32", log=print,
              **overrides):
  """(module, params): our module built from the checkpoint's config.json (fields can be
  overridden, e.g. scan_layers=False) and its parameters on the default device."""
  checkpoint = Checkpoint(path)
  module_arch = arch_for(checkpoint, arch)
  if not hasattr(module_arch, "build"):
    raise ConversionError(f"{module_arch.NAME} checkpoints import into a family's part only "
                          "(load_part, --config.init.lm); we have no standalone module for it.")
  module, example = module_arch.build(checkpoint.config(), param_dtype=dtype, **overrides)
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *example)["params"])
  target = flatten(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                nn.meta.unbox(abstract)))
  return module, unflatten(load_part(path, target, arch=module_arch.NAME, log=log))


def export_hf(params: Mapping, module, directory: str, *, arch: str | None = None,
              dtype=None, max_shard_bytes: int = 2 << 30, drop: tuple[str, ...] = ()) -> list[str]:
  """Writes `params` of `module` (a DecoderLM, ViT, ...) as an HF checkpoint in `directory`:
  safetensors shards + config.json, LoRA merged into the base weights first. `arch` defaults
  to the module's usual source ('llama' for a DecoderLM with RMSNorm, 'mpt' with ALiBi,
  'gpt_neox' with LayerNorm, 'clip' for a ViT). `drop`: fullmatch regexes of params the HF
  model has no place for (parts new to our model). Returns the tensor names written."""
  dropped = [re.compile(p) for p in drop]
  params = unflatten({p: a for p, a in flatten(params).items()
                      if not any(r.fullmatch(p) for r in dropped)})
  if any(k.rsplit("/", 1)[-1] in ("lora_a", "lora_b") for k in flatten(params)):
    params = lora.merge_lora(params, module.lora_alpha)
  module_arch = ARCHS[arch] if arch else _default_arch(module)
  config = module_arch.hf_config(
      module, {p: tuple(a.shape) for p, a in flatten(params).items()})
  dtypes = {str(jnp.dtype(a.dtype)) for a in flatten(params).values()}
  config["torch_dtype"] = str(jnp.dtype(dtype)) if dtype else (
      dtypes.pop() if len(dtypes) == 1 else "float32")
  names = transfer.export(params, module_arch, directory, dtype=dtype,
                          max_shard_bytes=max_shard_bytes)
  storage.write_atomic(storage.join(directory, "config.json"), json.dumps(config, indent=2))
  return names


def _default_arch(module):
  name = type(module).__name__
  if name == "DecoderLM":
    if module.position == "alibi":
      return mpt
    return llama if module.norm_type == "rmsnorm" else gpt_neox
  if name == "ViT":
    return clip
  raise ConversionError(f"no default HF architecture for {name}; pass arch= one of "
                        f"{sorted(ARCHS)}.")
