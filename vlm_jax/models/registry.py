"""`build(config.model)` -> flax Module: maps `config.model.name` to a family's class.

Every other `config.model` field must be a field of that class (its hyperparameters); an
unknown field is an error naming the valid ones, so typos in configs fail loudly.
"""
import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from vlm_jax.models import cogagent, flamingo, minigpt_v2, prismer, simvlm

MODELS = {
    "simvlm": simvlm.SimVLM,
    "minigpt_v2": minigpt_v2.MiniGPTv2,
    "cogagent": cogagent.CogAgent,
    "flamingo": flamingo.Flamingo,
    "prismer": prismer.Prismer,
}
# name -> batch_spec(config.data, batch_size) -> {key: jax.ShapeDtypeStruct}
BATCH_SPECS = {
    "simvlm": simvlm.batch_spec,
    "minigpt_v2": minigpt_v2.batch_spec,
    "cogagent": cogagent.batch_spec,
    "flamingo": flamingo.batch_spec,
    "prismer": prismer.batch_spec,
}


def model_fields(cls) -> set[str]:
  return {f.name for f in dataclasses.fields(cls) if f.init} - {"parent", "name"}


def build(model_config) -> nn.Module:
  name = model_config.name
  if name not in MODELS:
    raise ValueError(f"config.model.name={name!r}: expected one of {sorted(MODELS)}.")
  cls = MODELS[name]
  kwargs = {k: tuple(v) if isinstance(v, list) else v
            for k, v in model_config.items() if k != "name"}
  unknown = sorted(set(kwargs) - model_fields(cls))
  if unknown:
    raise ValueError(f"config.model has field(s) {unknown} that {cls.__name__} does not take; "
                     f"valid: {sorted(model_fields(cls))}.")
  return cls(**kwargs)


def batch_spec(config, batch_size: int | None = None) -> dict:
  """The family's batch as ShapeDtypeStructs (default: the global `config.batch_size`)."""
  return BATCH_SPECS[config.model.name](config.data, batch_size or config.batch_size)


def dummy_batch(config, batch_size: int | None = None) -> dict:
  """Zeros with the batch's shapes, masks set to one (for init and shape checks)."""
  spec = batch_spec(config, batch_size)
  return {k: (jnp.ones if "mask" in k or k == "loss_weight" else jnp.zeros)(s.shape, s.dtype)
          for k, s in spec.items()}
