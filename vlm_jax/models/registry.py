"""A family's model module by name, and the model built from `config.model`.

`config.model.name` names the family: its module is `vlm_jax.models.<name>`, or
`<name>.model` for a family outside the package (any importable package). The module
provides (docs/architecture.md has the whole plug-in contract):

  build(config.model) -> Module  the family's flax module; each sub-config (`config.model.lm`,
                                 `.vision`, ...) is passed whole to the module it configures
                                 (`part(DecoderLM, config.model, "lm")`)
  batch_spec(data_config, B)     {key: jax.ShapeDtypeStruct} of a batch
  flops_parts(config, causal_half)   forward FLOPs per example per part (`vlm_jax.flops`)
  flops_treatment(config)        optional: part -> training rule (frozen parts)
  attention_masks(config, batch) optional: {title: [T, S] bool} for the model notebook
  STATISTICS                     optional: fullmatch regexes of params that hold statistics
                                 (BatchNorm running mean/var): always frozen, never trained

Nothing here names a family.
"""
import dataclasses
from types import ModuleType

import flax
import flax.linen as nn
import jax.numpy as jnp

from vlm_jax import plugin
from vlm_jax.config import ConfigError

# Options every family's Model takes at the top level of config.model, passed on by the
# family to each of its stacks (so they are not sub-config fields).
# attention_impl: xla | splash | cudnn (nn/fused_attention.py), for every attention stack.
COMMON = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl")


def load(name: str) -> ModuleType:
  """`vlm_jax.models.<name>`, or `<name>.model` for a family outside the package."""
  if not name:
    raise ConfigError("config.model.name is empty: name the family (e.g. 'simvlm').")
  try:
    return plugin.family_module(name, "vlm_jax.models", "model")
  except plugin.FamilyNotFound as e:
    raise ConfigError(f"config.model.name={name!r}: {e}.") from None


def fields_of(cls) -> set[str]:
  return {f.name for f in dataclasses.fields(cls) if f.init} - {"parent", "name"}


def common(model_config) -> dict:
  """The COMMON options of config.model, for every stack of the family (dtypes as
  jnp.dtype)."""
  return {"scan_layers": model_config.scan_layers, "remat_policy": model_config.remat_policy,
          "attention_impl": model_config.attention_impl, "dtype": jnp.dtype(model_config.dtype),
          "param_dtype": jnp.dtype(model_config.param_dtype)}


def check_keys(model_config, keys) -> None:
  """config.model may hold only `name`, COMMON and the family's `keys`."""
  unknown = sorted(set(model_config) - {"name", *COMMON, *keys})
  if unknown:
    raise ConfigError(f"config.model has field(s) {unknown} that the {model_config.name!r} "
                      f"family does not take; valid: {sorted({*COMMON, *keys})}.")


def sub_config(cls, model_config, key: str, fixed=()) -> flax.core.FrozenDict:
  """config.model.<key> as the fields of `cls` it sets (a FrozenDict, hashable as a module
  field); `fixed`: the fields the family sets itself. An unknown field is an error naming it
  and the valid ones."""
  value = model_config[key]
  value = value.to_dict() if hasattr(value, "to_dict") else dict(value)
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
  valid = fields_of(cls) - set(fixed) - set(COMMON)
  unknown = sorted(set(fields) - valid)
  if unknown:
    raise ConfigError(f"config.model.{key} has field(s) {unknown} that {cls.__name__} does "
                      f"not take; valid: {sorted(valid)}.")
  return flax.core.FrozenDict(fields)


def part(cls, model_config, key: str, **fixed):
  """`cls(**config.model.<key>, **fixed)`: a sub-config passed whole to the module it
  configures; `fixed` are the fields the family sets itself (dtype, layer class, ...).
  Dicts become FrozenDicts: the module is a field of the family's and must hash."""
  fixed = {k: flax.core.FrozenDict(v) if isinstance(v, dict) else v for k, v in fixed.items()}
  return cls(**sub_config(cls, model_config, key, fixed), **fixed)


def build(model_config) -> nn.Module:
  """The family's model from config.model (its module's `build`)."""
  return load(model_config.name).build(model_config)


def statistics(model_config) -> tuple[str, ...]:
  """The family's STATISTICS: params no optimizer may touch, whatever config.frozen says."""
  return tuple(getattr(load(model_config.name), "STATISTICS", ()))


def batch_spec(config, batch_size: int | None = None) -> dict:
  """The family's batch as ShapeDtypeStructs (default: the global `config.batch_size`)."""
  return load(config.model.name).batch_spec(config.data, batch_size or config.batch_size)


def dummy_batch(config, batch_size: int | None = None) -> dict:
  """Zeros with the batch's shapes, masks set to one (for init and shape checks)."""
  spec = batch_spec(config, batch_size)
  return {k: (jnp.ones if "mask" in k or k == "loss_weight" else jnp.zeros)(s.shape, s.dtype)
          for k, s in spec.items()}
