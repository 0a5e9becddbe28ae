"""Each family's data module: its processor (raw record -> the model's batch layout, by the
task's template), its tasks and mixtures, its evaluation tasks and box format. The contract
is in docs/architecture.md; `load(name)` finds one by the family's name."""
import pkgutil
from types import ModuleType

from vlm_jax import plugin


def load(name: str) -> ModuleType:
  """`vlm_jax.data.families.<name>`, or `<name>.data` for a family outside the package."""
  return plugin.family_module(name, __name__, "data")


def available() -> list[str]:
  """The families shipped with the package."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__))


def box_format(name: str):
  """The family's box format (a `data/boxes/` module), or None."""
  return getattr(load(name), "BOX_FORMAT", None)
