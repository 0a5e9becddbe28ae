"""Device mesh from the config, and the logical-axis helpers every room uses.

Three mesh axes, as in t5x/MaxText: `data` (pure data parallelism), `fsdp` (data parallelism
with parameters sharded), `tensor` (intra-layer model parallelism). Logical names on params and
activations are mapped to these axes by `config.logical_axis_rules`.
"""
import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_mesh_shape(shape, num_devices: int, field: str = "mesh.shape") -> tuple[int, ...]:
  """Replaces a single -1 so the product equals `num_devices`."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"config.{field}={shape} must have {len(MESH_AXES)} entries {MESH_AXES}.")
  if shape.count(-1) > 1:
    raise ValueError(f"config.{field}={shape}: at most one entry may be -1.")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(
          f"config.{field}={shape}: {num_devices} devices are not divisible by {known}.")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(
        f"config.{field}={shape} needs {math.prod(shape)} devices but {num_devices} are "
        f"available; use -1 in one axis to fill.")
  return shape


def make_mesh(mesh_config, devices=None) -> Mesh:
  """Mesh with axes (data, fsdp, tensor); `dcn_shape` splits axes across slices."""
  devices = list(devices if devices is not None else jax.devices())
  dcn_shape = tuple(int(s) for s in mesh_config.get("dcn_shape", (1, 1, 1)))
  num_slices = math.prod(dcn_shape)
  if len(devices) % num_slices:
    raise ValueError(f"config.mesh.dcn_shape={dcn_shape} does not divide {len(devices)} devices.")
  ici_shape = resolve_mesh_shape(mesh_config.shape, len(devices) // num_slices)
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if num_slices == 1:
    return jax.make_mesh(ici_shape, MESH_AXES, axis_types=axis_types, devices=devices)
  device_array = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices)
  return Mesh(device_array, MESH_AXES, axis_types=axis_types)


def rules_from_config(config) -> tuple:
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in config.logical_axis_rules)


def logical_shardings(boxed_tree, mesh: Mesh, rules):
  """NamedShardings for a tree of `nn.Partitioned` boxes (or ShapeDtypeStructs of them).

  A dimension that its mesh axes do not divide (a 96-channel expert stem under fsdp 64) is
  replicated instead: XLA cannot shard it evenly, and such parameters are small.
  """
  specs = nn.get_partition_spec(boxed_tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)

  def divisible(named: NamedSharding, shape) -> NamedSharding:
    spec = tuple(named.spec) + (None,) * (len(shape) - len(named.spec))
    kept = []
    for size, axes in zip(shape, spec):
      names = axes if isinstance(axes, tuple) else (() if axes is None else (axes,))
      kept.append(axes if size % math.prod(mesh.shape[n] for n in names) == 0 else None)
    return NamedSharding(mesh, PartitionSpec(*kept))

  # Shapes without unboxing: under a mesh, unboxing applies sharding constraints.
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  shapes = jax.tree.map(lambda x: tuple((x.value if is_box(x) else x).shape), boxed_tree,
                        is_leaf=is_box)
  return jax.tree.map(divisible, shardings, shapes)


def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
  """Batch arrays shard their leading axis like the logical `batch` axis."""
  spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
  return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch: dict, mesh: Mesh, rules) -> dict:
  """Global jax.Arrays from this process's rows of the batch (multi-host safe)."""
  return {
      k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, np.ndim(v)), v)
      for k, v in local_batch.items()
  }
