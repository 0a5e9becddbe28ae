"""Trainer defaults shared by every family's config, and config loading with clear errors.

A family config (`configs/<family>.py`) calls `base_config()` and fills `model` and `data`.
"""
import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 32  # global, across all processes
  c.num_train_steps = 1000
  c.grad_accum_steps = 1
  c.log_every_steps = 50

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.schedule = "cosine"  # cosine | rsqrt | constant
  c.optimizer.end_lr_fraction = 0.0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.01
  # Params whose '/'-joined path matches one of these get no weight decay.
  c.optimizer.no_decay = (r".*bias$", r".*scale$", r".*embedding$", r".*pos_embedding$")
  c.optimizer.grad_clip_norm = 1.0

  # Regexes over '/'-joined parameter paths; matched sub-trees get no gradient at all.
  c.frozen = ()

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor) within a slice; -1 fills
  c.mesh.dcn_shape = (1, 1, 1)  # across slices (multi-slice pods)
  c.logical_axis_rules = (
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("vocab", "tensor"),
      ("kv", None),
      ("length", None),
      ("layers", None),
      ("conv_in", None),
      ("conv_out", "tensor"),
  )

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 200
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True

  c.model = ml_collections.ConfigDict()
  c.model.name = ""
  c.model.dtype = "float32"  # compute dtype: bfloat16 on TPU/GPU
  c.model.param_dtype = "float32"
  c.model.scan_layers = True
  c.model.remat_policy = "none"  # none | full | dots

  c.data = ml_collections.ConfigDict()
  c.data.mixture = ""
  c.data.seed = 0
  c.data.num_workers = 0
  return c
