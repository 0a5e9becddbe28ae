"""The toy family's config: `vlm-train --config tests/toy_family/config.py:tiny ...` with
tests/ on PYTHONPATH."""
from vlm_jax import config as config_lib

SIZES = {"tiny": dict(width=64, num_layers=2, num_heads=4, mlp_dim=128)}


def get_config(arg: str = "tiny"):
  size, options = config_lib.parse_arg(arg, SIZES, {}, "toy_family")
  c = config_lib.base_config("toy_family", options)
  c.batch_size = 16
  c.num_train_steps = 60
  c.log_every_steps = 10
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 5
  c.model.lm = dict(SIZES[size], vocab_size=1024)
  c.model.patch_size = 8
  c.data.mixture = "toy_captions"
  c.data.image_size = 32
  c.data.sequence_length = 24
  return c
