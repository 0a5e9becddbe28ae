"""The inspection notebooks run top to bottom on tiny configs, and every plot cell draws.

One short 2-process SimVLM training job provides the workdir the run notebook reads. Notebook
parameters travel as environment variables (the kernel inherits this process's
environment, conftest's 8 simulated devices included). Cells tagged "plot" must output an
image.
"""
import os
import subprocess
import sys

import nbclient
import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "notebooks")
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A workdir as a pod job writes it: 2 processes (the notebook itself is one)."""
  path = str(tmp_path_factory.mktemp("run"))
  subprocess.run([sys.executable, "-m", "vlm_jax.cli.launch", "local", "--num-processes", "2",
                  "--config", os.path.join(REPO, "configs", "simvlm.py:tiny"), "--workdir", path,
                  "--config.batch_size=8", "--config.num_train_steps=4",
                  "--config.log_every_steps=1", "--config.checkpoint.every_steps=2",
                  "--config.optimizer.warmup_steps=2", "--config.profile.steps=(3,)"],
                 check=True, capture_output=True, timeout=900,
                 env={**os.environ, "PYTHONPATH": REPO})
  return path


def execute(name: str, env: dict):
  with open(os.path.join(NOTEBOOKS, name)) as f:
    notebook = nbformat.read(f, as_version=4)
  old = dict(os.environ)
  os.environ.update(env, PYTHONPATH=REPO, VLM_JAX_REPO_DIR=REPO)
  try:
    nbclient.NotebookClient(notebook, timeout=TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": REPO}}).execute()
  finally:
    os.environ.clear()
    os.environ.update(old)
  return notebook


def check_plots(notebook):
  plots = [c for c in notebook.cells if "plot" in c.metadata.get("tags", [])]
  assert plots, "no cell is tagged 'plot'"
  for cell in plots:
    images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
    assert images, f"plot cell drew no image:\n{cell.source[:300]}"


def test_notebooks_are_built_from_their_sources():
  result = subprocess.run([sys.executable, os.path.join(NOTEBOOKS, "build.py"), "--check"],
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr


def test_inspect_model():
  check_plots(execute("inspect_model.ipynb", {}))


def test_inspect_data():
  check_plots(execute("inspect_data.ipynb", {"VLM_NB_BATCH": "4", "VLM_NB_RECORDS": "200"}))


def test_inspect_run(workdir):
  notebook = execute("inspect_run.ipynb", {"VLM_NB_WORKDIR": workdir})
  check_plots(notebook)
  text = "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []))
  assert "step 2" in text and "step 4" in text  # both checkpoints listed
  assert "goodput " in text and "% of " in text  # the time accounts' summary
  assert text.count("profile: ") == 2 and "tensorboard --logdir" in text  # one per process
