"""What a model is: its parameters (counts, logical axes, shardings), FLOPs, the attention
masks it builds, gate/adaptor values. `describe` is what `vlm-info` prints."""
import collections
import math

import flax.linen as nn
import numpy as np

from vlm_jax import distributed
from vlm_jax import flops as flops_lib
from vlm_jax import params as params_lib
from vlm_jax import sharding
from vlm_jax.models import registry


# ----------------------------------------------------------------------------------------
# Parameters and FLOPs
# ----------------------------------------------------------------------------------------
def _axes(a):
  return list(a) if isinstance(a, tuple) else a


def describe(config, num_devices: int) -> dict:
  """Parameter counts (total, trainable, frozen; per top-level module), FLOPs per example,
  the mesh, and each parameter's logical axes and mesh sharding (eval_shape only: no
  allocation). Raises ValueError for config.frozen patterns that match no parameter."""
  model = registry.build(config.model)
  # One example: parameters do not depend on the batch, and a paper config's full dummy batch
  # (CogAgent-18B: 4608 images of 1120 px) would be allocated.
  boxed = params_lib.boxed_abstract(model, registry.dummy_batch(config, 1))
  rules = sharding.rules_from_config(config)
  params = params_lib.strip_boxes(boxed)
  missing = params_lib.unmatched_patterns(params, config.frozen)
  if missing:
    raise ValueError(f"config.frozen pattern(s) {missing} match no parameter.")
  _, frozen = params_lib.split_frozen(params, params_lib.frozen_patterns(config))
  frozen_keys = set(params_lib.flatten(frozen))
  logical = params_lib.flatten(nn.get_partition_spec(boxed))
  counts = {"total": 0, "trainable": 0, "frozen": 0}
  by_module, shardings = {}, {}
  for path, leaf in params_lib.flatten(params).items():
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
  counted = flops_lib.flops_per_example(config, flops_lib.config_treatment(config))
  return {
      "model": config.model.name,
      "params": {**counts, "by_module": by_module},
      "flops_per_example": {k: v for k, v in counted.items() if k != "parts"},
      "mesh": dict(zip(sharding.MESH_AXES, mesh_shape)),
      "shardings": shardings,
  }


def param_rows(config, num_devices: int) -> tuple[list, dict]:
  """Rows (module, total, trainable, frozen, sharding summary) per top-level module, and
  `describe`'s full description."""
  described = describe(config, num_devices)
  layouts = collections.defaultdict(collections.Counter)
  for path, leaf in described["shardings"].items():
    axes = [a for a in leaf["mesh"] if a]
    layouts[path.split("/")[0]]["x".join(map(str, axes)) if axes else "replicated"] += 1
  rows = []
  for module, counts in sorted(described["params"]["by_module"].items()):
    summary = ", ".join(f"{k}: {n}" for k, n in layouts[module].most_common())
    rows.append((module, counts["total"], counts["trainable"], counts["frozen"], summary))
  p = described["params"]
  rows.append(("TOTAL", p["total"], p["trainable"], p["frozen"], ""))
  return rows, described


def flops_rows(config) -> list:
  """(part, forward FLOPs per example) and the train total (vlm_jax.flops)."""
  counted = flops_lib.flops_per_example(config)
  rows = [(name, f"{value:.3e}") for name, value in counted["parts"].items()]
  return rows + [("forward", f"{counted['forward']:.3e}"), ("train", f"{counted['train']:.3e}")]


def attention_masks(config, batch, example: int = 0) -> dict:
  """{title: [rows, cols] bool} of the masks the family draws for example `example` (its
  model module's `attention_masks`; {} when it declares none)."""
  masks = getattr(registry.load(config.model.name), "attention_masks", None)
  return masks(config, batch, example) if masks else {}


# ----------------------------------------------------------------------------------------
# Parameter values of interest
# ----------------------------------------------------------------------------------------
def flat_params(params) -> dict:
  return params_lib.flatten(distributed.fetch(params))


def gate_values(params) -> dict:
  """{path of a Flamingo gated block's gate: tanh(gate) per layer} (scanned gates are
  stacked over layers)."""
  return {path: np.atleast_1d(np.tanh(np.asarray(value)))
          for path, value in flat_params(params).items()
          if path.endswith(("attn_gate", "ff_gate"))}


def adaptor_norms(params) -> dict:
  """{adaptor sub-tree path: L2 norm of its weights per layer} (Prismer's bottleneck
  adaptors, params under an `adaptor` module; scanned stacks give one norm per layer)."""
  sums = collections.defaultdict(float)
  for path, value in flat_params(params).items():
    parts = path.split("/")
    if "adaptor" not in parts:
      continue
    module = "/".join(parts[:parts.index("adaptor") + 1])
    value = np.asarray(value, np.float64)
    scanned = "layers" in parts[:parts.index("adaptor")] and value.ndim > 1
    sums[module] = sums[module] + (np.sum(value.reshape(value.shape[0], -1) ** 2, axis=1)
                                   if scanned else np.sum(value ** 2))
  return {module: np.atleast_1d(np.sqrt(total)) for module, total in sums.items()}
