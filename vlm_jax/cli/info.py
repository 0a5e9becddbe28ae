"""vlm-info --config configs/<family>.py:<size> [--num-devices N] [--config.a.b=value ...]

Prints, as JSON: parameter counts (total, trainable, frozen; per top-level module), FLOPs per
example, the mesh, and each parameter's logical axes and mesh sharding. Uses jax.eval_shape
only, so paper-size configs run on a laptop CPU in seconds.
"""
import argparse
import json
import math

from vlm_jax.cli import common


def describe(config, num_devices: int) -> dict:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from flax import traverse_util

  from vlm_jax import flops as flops_lib
  from vlm_jax import sharding
  from vlm_jax.models import registry
  from vlm_jax.train import state as state_lib

  model = registry.build(config.model)
  spec = registry.batch_spec(config, config.batch_size)
  rules = sharding.rules_from_config(config)

  def init(rng):
    batch = {k: jnp.zeros(s.shape, s.dtype) for k, s in spec.items()}
    return model.init({"params": rng, "dropout": rng}, batch, deterministic=True)["params"]

  boxed = jax.eval_shape(init, jax.random.key(0))
  params = state_lib.strip_boxes(boxed)
  missing = state_lib.unmatched_patterns(params, config.frozen)
  if missing:
    raise SystemExit(f"vlm-info: error: config.frozen pattern(s) {missing} match no parameter.")
  _, frozen = state_lib.split_frozen(params, config.frozen)
  frozen_keys = set(traverse_util.flatten_dict(frozen, sep="/"))
  logical = traverse_util.flatten_dict(nn.get_partition_spec(boxed), sep="/")

  counts = {"total": 0, "trainable": 0, "frozen": 0}
  by_module, shardings = {}, {}
  for path, leaf in traverse_util.flatten_dict(params, sep="/").items():
    n = math.prod(leaf.shape)
    kind = "frozen" if path in frozen_keys else "trainable"
    module = by_module.setdefault(path.split("/")[0], {"total": 0, "trainable": 0, "frozen": 0})
    for c in (counts, module):
      c["total"] += n
      c[kind] += n
    names = tuple(logical[path]) if logical.get(path) is not None else (None,) * leaf.ndim
    shardings[path] = {"shape": list(leaf.shape), "logical": list(names),
                       "mesh": [_axes(a) for a in nn.logical_to_mesh_axes(names, rules)]}
  mesh_shape = sharding.resolve_mesh_shape(config.mesh.shape, num_devices)
  return {
      "model": config.model.name,
      "params": {**counts, "by_module": by_module},
      "flops_per_example": {k: v for k, v in flops_lib.flops_per_example(
          config.model, config.data, flops_lib.config_treatment(config)).items() if k != "parts"},
      "mesh": dict(zip(sharding.MESH_AXES, mesh_shape)),
      "shardings": shardings,
  }


def _axes(a):
  return list(a) if isinstance(a, tuple) else a


def main(argv=None):
  parser = argparse.ArgumentParser(prog="vlm-info", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num-devices", type=int, default=None,
                      help="devices to resolve the mesh for (default: this machine's)")
  parser.add_argument("--no-shardings", action="store_true", help="omit per-parameter shardings")
  config, args = common.parse_with_config(parser, argv)
  import jax
  info = describe(config, args.num_devices or jax.device_count())
  if args.no_shardings:
    del info["shardings"]
  print(json.dumps(info, indent=2))


if __name__ == "__main__":
  main()
