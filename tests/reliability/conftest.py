"""One uninterrupted reference run, shared by every reliability test that compares losses."""
import pytest

import reliability_runs as runs


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
  """(workdir, losses) of an uninterrupted STEPS-step run: checkpoints at 10, 15 and 20."""
  workdir = tmp_path_factory.mktemp("reference")
  result = runs.run(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  losses = runs.read_losses(workdir)
  assert sorted(losses) == list(range(1, runs.STEPS + 1))
  return workdir, losses
