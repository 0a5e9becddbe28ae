"""Every shipped config (configs/*.py) for every size in its SIZES table builds its model and
initialises under jax.eval_shape (no allocation)."""
import glob
import importlib.util
import os

import flax.linen as nn
import jax
import pytest

from vlm_jax import config as config_lib
from vlm_jax.models import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def _sizes(path):
  spec = importlib.util.spec_from_file_location("cfg_" + os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return sorted(mod.SIZES)


CASES = [(path, size) for path in CONFIG_FILES for size in _sizes(path)]


def test_configs_exist():
  assert CONFIG_FILES and CASES


@pytest.mark.parametrize("path,size", CASES,
                         ids=[f"{os.path.basename(p)}:{s}" for p, s in CASES])
def test_config_builds_and_eval_shapes(path, size):
  config = config_lib.load_config(f"{path}:{size}")
  model = registry.build(config.model)
  spec = registry.batch_spec(config, 2)
  params = jax.eval_shape(lambda b: model.init(jax.random.key(0), b)["params"], spec)
  assert sum(x.size for x in jax.tree.leaves(nn.unbox(params))) > 0
  logits = jax.eval_shape(lambda p, b: model.apply({"params": nn.unbox(p)}, b), params, spec)
  assert logits.shape[:2] == spec["targets"].shape
  assert logits.shape[-1] == config.model.lm.vocab_size
  assert not config.frozen or all(isinstance(p, str) for p in config.frozen)


def test_size_options_are_parsed():
  path = os.path.join(ROOT, "configs", "simvlm.py")
  config = config_lib.load_config(f"{path}:tiny,scan=False,remat=full")
  assert config.model.scan_layers is False and config.model.remat_policy == "full"
  with pytest.raises(ValueError, match="size"):
    config_lib.load_config(f"{path}:gigantic")
  with pytest.raises(ValueError, match="option"):
    config_lib.load_config(f"{path}:tiny,scna=False")
