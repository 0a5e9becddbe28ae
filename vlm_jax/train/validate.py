"""Checks that run before anything is compiled: the config against the devices, and the workdir.

Each failure is one line naming the config field (or path) and the fix. Frozen-parameter
regexes are checked where the parameter tree is first known (StateFactory, before compiling).
"""
import math
import os
import shutil
import uuid

from vlm_jax import sharding
from vlm_jax import storage
from vlm_jax.config import ConfigError
from vlm_jax.data import mixture as mixture_lib
from vlm_jax.models import registry
from vlm_jax.train import nonfinite


class WorkdirError(OSError):
  """The workdir cannot hold checkpoints; the message names the path and the fix."""


# ----------------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------------
def _mesh_shape(config, num_devices: int) -> dict[str, int]:
  dcn = tuple(int(s) for s in config.mesh.get("dcn_shape", (1, 1, 1)))
  slices = math.prod(dcn)
  if len(dcn) != len(sharding.MESH_AXES) or num_devices % slices:
    raise ConfigError(f"config.mesh.dcn_shape={dcn} does not divide the {num_devices} devices "
                      f"into slices; use {len(sharding.MESH_AXES)} entries whose product "
                      f"divides {num_devices}.")
  try:
    ici = sharding.resolve_mesh_shape(config.mesh.shape, num_devices // slices)
  except ValueError as e:
    raise ConfigError(f"{e} Set --config.mesh.shape so its product is {num_devices // slices} "
                      "(e.g. (-1, 1, 1)).") from None
  return {axis: i * d for axis, i, d in zip(sharding.MESH_AXES, ici, dcn)}


def _batch_axes(config) -> tuple[str, ...]:
  for name, axes in sharding.rules_from_config(config):
    if name == "batch":
      return (axes,) if isinstance(axes, str) else tuple(axes or ())
  return ()


def _check_batch(config, mesh: dict[str, int], process_count: int) -> None:
  axes = _batch_axes(config)
  ways = math.prod(mesh[a] for a in axes)
  batch, accum = config.batch_size, config.grad_accum_steps
  if accum < 1 or batch % accum:
    raise ConfigError(f"config.grad_accum_steps={accum} must be >= 1 and divide "
                      f"config.batch_size={batch}.")
  if batch % ways:
    raise ConfigError(
        f"config.batch_size={batch} is not divisible by the mesh's batch axes {axes} "
        f"({ways} ways, mesh {mesh}); use a multiple of {ways}, e.g. "
        f"--config.batch_size={max(ways, batch // ways * ways)}.")
  if batch % process_count:
    raise ConfigError(f"config.batch_size={batch} is not divisible by the {process_count} "
                      f"processes; use a multiple of {process_count}.")


def _check_image_and_patch(config) -> None:
  """A sub-config's `patch_size` (config.model.<part>.patch_size) must divide the images it
  sees: config.data.<part>_image_size if the data has one (CogAgent's high_res), else
  config.data.image_size."""
  for part, sub in config.model.items():
    patch = sub.get("patch_size") if hasattr(sub, "get") else None
    if not patch:
      continue
    image_field = (f"{part}_image_size" if f"{part}_image_size" in config.data
                   else "image_size")
    size = config.data.get(image_field)
    if size is not None and size % patch:
      raise ConfigError(
          f"config.data.{image_field}={size} is not a multiple of "
          f"config.model.{part}.patch_size={patch}; use {max(patch, size // patch * patch)} "
          f"or {(size // patch + 1) * patch}.")


def _check_counts(config) -> None:
  for field in ("num_train_steps", "log_every_steps", "checkpoint.every_steps",
                "checkpoint.keep", "nonfinite.rewind_after"):
    value = config
    for part in field.split("."):
      value = value[part]
    if value < 1:
      raise ConfigError(f"config.{field}={value} must be >= 1.")
  if config.nonfinite.max_rewinds < 0:
    raise ConfigError(f"config.nonfinite.max_rewinds={config.nonfinite.max_rewinds} must be "
                      ">= 0.")
  if config.nonfinite.policy not in nonfinite.POLICIES:
    raise ConfigError(f"config.nonfinite.policy={config.nonfinite.policy!r}: expected one of "
                      f"{nonfinite.POLICIES}.")


def _check_mixture(config) -> None:
  """config.data.mixture: every source known and non-empty, rates and loss weights > 0,
  templates the family has (data/mixture.py)."""
  try:
    mixture_lib.check(config.data, config.model.name)
  except mixture_lib.MixtureError as e:
    raise ConfigError(str(e)) from None


def _path_fields(config) -> dict[str, tuple[str, str]]:
  """config field -> (path, "read" or "write") for every path the config names."""
  fields = {"data.data_dir": config.data.get("data_dir", ""),
            "data.vocab_path": config.data.get("vocab_path", ""),
            "init_from": config.get("init_from", ""),
            **{f"init.{part}": path for part, path in config.get("init", {}).items()}}
  try:  # ingested directories named by URL (a malformed mixture: _check_mixture says why)
    fields.update({e.at("source")[len("config."):]: e.source
                   for e in mixture_lib.entries(config.data.mixture) if "://" in e.source})
  except mixture_lib.MixtureError:
    pass
  paths = {field: (path, "read") for field, path in fields.items() if path}
  cache = config.get("compilation_cache_dir", "")
  if cache and cache != "none":
    paths["compilation_cache_dir"] = (cache, "write")
  return paths


def _check_paths(config) -> None:
  """Each path is local or gs://; a gs:// one is reachable with these credentials (bucket,
  object, permission), so a wrong path fails here rather than after compiling."""
  for field, (path, use) in _path_fields(config).items():
    try:
      if storage.is_gcs(storage.validate(path)):
        (storage.check_writable if use == "write" else storage.check_readable)(path)
    except storage.StorageError as e:
      raise ConfigError(f"config.{field}: {e}") from None


def check_config(config, num_devices: int, process_count: int = 1) -> None:
  """Raises ConfigError for a config that cannot train on `num_devices` devices."""
  registry.load(config.model.name)  # a clear error for an unknown family
  _check_counts(config)
  _check_paths(config)
  mesh = _mesh_shape(config, num_devices)
  _check_batch(config, mesh, process_count)
  _check_image_and_patch(config)
  _check_mixture(config)


# ----------------------------------------------------------------------------------------------
# Workdir: writable before training starts; room for one more checkpoint.
# ----------------------------------------------------------------------------------------------
def check_workdir_writable(workdir: str) -> None:
  """Creates `workdir` and writes, syncs and deletes a probe file in it (gs://: checks the
  scheme, credentials, bucket and permission with a probe object)."""
  try:
    if storage.is_gcs(storage.validate(workdir)):
      storage.check_writable(workdir)
      return
  except storage.StorageError as e:
    raise WorkdirError(f"--workdir {e}") from None
  probe = os.path.join(workdir, f".write_probe_{uuid.uuid4().hex}")
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, "wb") as f:
      f.write(b"\0" * 4096)
      f.flush()
      os.fsync(f.fileno())
  except OSError as e:
    raise WorkdirError(f"--workdir {workdir} cannot be written ({e.strerror or e}); choose a "
                       "writable directory with free space.") from None
  finally:
    if os.path.exists(probe):
      os.remove(probe)


def check_free_space(workdir: str, checkpoint_bytes: int) -> None:
  if storage.is_gcs(workdir):  # a bucket has no free-space figure to check
    return
  free = shutil.disk_usage(workdir).free
  if free < checkpoint_bytes:
    raise WorkdirError(f"--workdir {workdir} has {free / 2**20:.1f} MiB free but one checkpoint "
                       f"needs about {checkpoint_bytes / 2**20:.1f} MiB; free space or choose "
                       "another --workdir.")
