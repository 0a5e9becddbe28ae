"""Small models for tests, built the way vlm-train builds them: `registry.build` on a
config.model of sub-configs (`lm`, `vision`, ...) and the options every family has."""
import ml_collections

from vlm_jax.models import registry

COMMON = dict(dtype="float32", param_dtype="float32", scan_layers=True, remat_policy="none",
              attention_impl="xla")


def build(name: str, **fields):
  return registry.build(ml_collections.ConfigDict(dict(COMMON, name=name, **fields)))
