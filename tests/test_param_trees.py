"""Every shipped config builds exactly the parameter tree recorded in
fixtures/param_trees.json (paths, shapes, which are frozen), so checkpoints written before a
refactor still restore. Regenerate the fixture only for an intended change of a model."""
import json
import os
import re

import flax.linen as nn
import jax
import pytest

from vlm_jax import config as config_lib
from vlm_jax import params as params_lib
from vlm_jax.models import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "tests", "fixtures", "param_trees.json")) as f:
  RECORDED = json.load(f)


def parameter_tree(spec: str) -> dict:
  """'/'-path -> shape (+ "frozen") of configs/<spec>, by jax.eval_shape."""
  config = config_lib.load_config(os.path.join(ROOT, "configs", spec))
  model = registry.build(config.model)
  params = jax.eval_shape(lambda b: model.init(jax.random.key(0), b)["params"],
                          registry.batch_spec(config, 1))
  frozen = [re.compile(p) for p in config.frozen]
  return {path: list(leaf.shape) + (["frozen"] if any(p.fullmatch(path) for p in frozen) else [])
          for path, leaf in params_lib.flatten(nn.unbox(params)).items()}


@pytest.mark.parametrize("spec", sorted(RECORDED))
def test_parameter_tree_is_the_recorded_one(spec):
  got, want = parameter_tree(spec), RECORDED[spec]
  assert sorted(set(want) - set(got)) == [] and sorted(set(got) - set(want)) == []
  assert {p: got[p] for p in want if got[p] != want[p]} == {}
