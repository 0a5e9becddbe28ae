"""Builds notebooks/<name>.ipynb from notebooks/src/<name>.py (the reviewed source).

    python notebooks/build.py          # rewrite every notebook from its source
    python notebooks/build.py --check  # exit 1 if a committed .ipynb differs from its source

Source format ("percent" cells, as Jupytext/VS Code read them):

    # %% [markdown]
    # # A title
    # Some text.

    # %% tags=["plot"]
    plt.plot(...)

A code cell runs until the next `# %%` line. `tags=[...]` become the cell's metadata tags;
tests/test_notebooks.py requires every cell tagged "plot" to output an image. Outputs are not
stored: CI executes the notebooks, the committed files stay small and diff cleanly.
"""
import ast
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
METADATA = {
    "accelerator": "TPU",
    "colab": {"provenance": []},
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}


def _cell(kind: str, tags: list, lines: list) -> dict:
  while lines and not lines[-1].strip():
    lines.pop()
  if kind == "markdown":
    lines = [line[2:] if line.startswith("# ") else line.lstrip("#") for line in lines]
  source = [line + "\n" for line in lines]
  if source:
    source[-1] = source[-1][:-1]
  cell = {"cell_type": kind, "metadata": {"tags": tags} if tags else {}, "source": source}
  if kind == "code":
    cell.update(execution_count=None, outputs=[])
  return cell


def _header(line: str) -> tuple[str, list]:
  rest = line[len("# %%"):].strip()
  kind = "code"
  if rest.startswith("[markdown]"):
    kind, rest = "markdown", rest[len("[markdown]"):].strip()
  tags = []
  if rest:
    key, _, value = rest.partition("=")
    if key.strip() != "tags":
      raise ValueError(f"cell header {line!r}: only tags=[...] is understood")
    tags = ast.literal_eval(value.strip())
  return kind, tags


def notebook_from_source(text: str) -> dict:
  cells, kind, tags, lines = [], None, [], []
  for line in text.splitlines():
    if line.startswith("# %%"):
      if kind is not None:
        cells.append(_cell(kind, tags, lines))
      (kind, tags), lines = _header(line), []
    elif kind is not None:
      lines.append(line)
  if kind is not None:
    cells.append(_cell(kind, tags, lines))
  return {"cells": cells, "metadata": METADATA, "nbformat": 4, "nbformat_minor": 5}


def _dumps(notebook: dict) -> str:
  # nbformat 4.5 wants cell ids; stable ones keep rebuilds byte-identical.
  for i, cell in enumerate(notebook["cells"]):
    cell["id"] = f"cell-{i}"
  return json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"


def sources() -> list:
  return sorted(glob.glob(os.path.join(HERE, "src", "*.py")))


def target(source: str) -> str:
  return os.path.join(HERE, os.path.basename(source)[:-3] + ".ipynb")


def build(source: str) -> str:
  with open(source) as f:
    return _dumps(notebook_from_source(f.read()))


def main(argv) -> int:
  check = "--check" in argv
  stale = []
  for source in sources():
    text, path = build(source), target(source)
    if check:
      if not os.path.isfile(path) or open(path).read() != text:
        stale.append(path)
    else:
      with open(path, "w") as f:
        f.write(text)
      print(f"wrote {os.path.relpath(path)}")
  if stale:
    print("out of date (run python notebooks/build.py): " + ", ".join(stale))
  return 1 if stale else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
