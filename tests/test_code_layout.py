"""The house rules of docs/architecture.md, checked on the source: no import cycle among
vlm_jax modules (function-level imports included), the rooms import only what they may, no
library module imports cli/, vlm_jax/data/'s top level is its core, no file over 400 lines,
no block of more than 10 lines written twice."""
import ast
import collections
import hashlib
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "vlm_jax")


def _modules() -> dict:
  """{dotted module name: file path} of every module of the package."""
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
        out[dotted.removesuffix(".__init__")] = path
  return out


MODULES = _modules()


def _imports(path: str) -> set:
  """vlm_jax modules a file imports, at any depth (`from a import b` -> a.b if a module)."""
  found = set()
  with open(path) as f:
    tree = ast.parse(f.read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.startswith("vlm_jax"))
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vlm_jax"):
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        found.add(full if full in MODULES else node.module)
  return {m for m in found if m in MODULES}


GRAPH = {module: _imports(path) for module, path in MODULES.items()}


def _cycles(graph) -> list:
  """Strongly connected components of more than one node (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_no_import_cycle_among_modules():
  assert _cycles(GRAPH) == []


def _room(module: str) -> str:
  parts = module.split(".")
  return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def test_no_import_cycle_among_rooms():
  """Top-level packages and modules (nn, models, data, train, evaluation, ...) form a DAG:
  no back-arrow such as train -> evaluation -> train."""
  rooms = collections.defaultdict(set)
  for module, imported in GRAPH.items():
    for other in imported:
      if _room(other) != _room(module):
        rooms[_room(module)].add(_room(other))
  assert _cycles(rooms) == []


# room -> the rooms it may import (besides itself)
ALLOWED = {
    "vlm_jax.nn": set(),
    "vlm_jax.models": {"vlm_jax.nn", "vlm_jax.config", "vlm_jax.plugin"},
    "vlm_jax.data": {"vlm_jax.plugin", "vlm_jax.storage"},
    "vlm_jax.storage": set(),  # the path layer (local and gs://) under every room
}


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_rooms_import_only_what_they_may(room):
  wrong = {(m, other) for m, imported in GRAPH.items() if _room(m) == room
           for other in imported if _room(other) not in ALLOWED[room] | {room}}
  assert wrong == set()


def test_no_library_module_imports_cli():
  wrong = {m for m, imported in GRAPH.items() if not m.startswith("vlm_jax.cli")
           and any(other.startswith("vlm_jax.cli") for other in imported)}
  assert wrong == set()


def test_the_top_level_of_data_is_its_core():
  top = {name for name in os.listdir(os.path.join(PACKAGE, "data"))
         if name.endswith(".py") or os.path.isfile(os.path.join(PACKAGE, "data", name,
                                                                "__init__.py"))}
  assert top == {"__init__.py", "vocab.py", "records.py", "preprocessors.py", "processor.py",
                 "health.py", "catalog.py", "mixture.py", "packing.py",
                 "packing_encoder_decoder.py", "pipeline.py",
                 "seqio_tasks.py", "boxes", "sources", "ingest", "families", "synthetic"}


def test_no_file_over_400_lines():
  long = {os.path.relpath(p, REPO): n for p in MODULES.values()
          if (n := sum(1 for _ in open(p))) > 400}
  assert long == {}


def test_no_block_of_more_than_10_lines_is_written_twice():
  """Exact repeats of 11 consecutive code lines (stripped; blank and comment-only lines and
  docstring-free imports skipped), in the package."""
  seen, repeated = {}, []
  for path in MODULES.values():
    with open(path) as f:
      lines = [(i + 1, line.strip()) for i, line in enumerate(f)]
    code = [(i, line) for i, line in lines if line and not line.startswith(("#", "import ",
                                                                             "from "))]
    for start in range(len(code) - 10):
      window = code[start:start + 11]
      key = hashlib.sha1("\n".join(line for _, line in window).encode()).hexdigest()
      where = (os.path.relpath(path, REPO), window[0][0])
      if key in seen and seen[key][0] != where[0] or key in seen and \
          abs(seen[key][1] - where[1]) >= 11:
        repeated.append((seen[key], where))
      seen.setdefault(key, where)
  assert repeated == []
