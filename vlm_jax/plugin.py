"""A family's module by name: the one shipped in the package (`vlm_jax.<room>.<name>`), else
`<name>.<module>` in a package of the user's (any importable package: a family outside
vlm_jax is three files, docs/architecture.md)."""
import importlib
from types import ModuleType


class FamilyNotFound(LookupError):
  """No module of that family can be imported."""


def family_module(name: str, package: str, module: str) -> ModuleType:
  """`<package>.<name>`, else `<name>.<module>`."""
  paths = (f"{package}.{name}", f"{name}.{module}")
  for path in paths:
    try:
      return importlib.import_module(path)
    except ModuleNotFoundError as e:
      if e.name not in (path, name, path.rpartition(".")[0]):
        raise  # the module exists but an import inside it failed
  raise FamilyNotFound(f"family {name!r}: neither {paths[0]} nor {paths[1]} can be imported")
