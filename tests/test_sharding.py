"""Parameters of the SimVLM base config, initialised directly sharded on a (2, 2, 2) mesh,
are laid out as the logical axis rules say (read back from each array's `.sharding`)."""
import os

import flax.linen as nn
import jax
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from vlm_jax import config as config_lib
from vlm_jax import sharding
from vlm_jax.models import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The default rules (vlm_jax/config.py), written out: embed -> fsdp, mlp/heads/vocab/conv_out
# -> tensor, everything else replicated.
EXPECTED = {
    "encoder/layers/self_attention/query/kernel": P(None, "fsdp", "tensor", None),
    "encoder/layers/self_attention/out/kernel": P(None, "tensor", None, "fsdp"),
    "encoder/layers/mlp/wi/kernel": P(None, "fsdp", "tensor"),
    "encoder/layers/mlp/wo/kernel": P(None, "tensor", "fsdp"),
    "encoder/layers/pre_mlp_norm/scale": P(None, "fsdp"),
    "decoder/layers/cross_attention/key/kernel": P(None, "fsdp", "tensor", None),
    "token_embedder/embedding": P("tensor", "fsdp"),
}


def test_base_config_parameters_are_sharded_as_the_rules_say():
  config = config_lib.load_config(os.path.join(ROOT, "configs", "simvlm.py") + ":base")
  config.mesh.shape = (2, 2, 2)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:8])
  rules = sharding.rules_from_config(config)
  model = registry.build(config.model)
  batch = registry.dummy_batch(config, 8)
  init = lambda key: model.init(key, batch)["params"]
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init, jax.random.key(0))
    shardings = sharding.logical_shardings(boxed, mesh, rules)
    params = jax.jit(lambda k: nn.unbox(init(k)), out_shardings=shardings)(jax.random.key(0))

  names = traverse_util.flatten_dict(nn.get_partition_spec(boxed), sep="/")
  flat = traverse_util.flatten_dict(params, sep="/")
  assert set(EXPECTED) <= set(flat), sorted(flat)
  mesh_axis = dict(rules)
  for path, array in flat.items():
    want = P(*(mesh_axis.get(name) for name in names[path]))
    assert array.sharding.spec == want, (path, names[path], array.sharding.spec)
    if path in EXPECTED:
      assert array.sharding.spec == EXPECTED[path], path
    # Each device holds exactly its slice: the global shape divided along the sharded axes.
    local = tuple(n // (mesh.shape[a] if a else 1) for n, a in zip(array.shape, want))
    assert {s.data.shape for s in array.addressable_shards} == {local}, path
  sharded = sum(a.size for p, a in flat.items() if any(flat[p].sharding.spec))
  assert sharded / sum(a.size for a in flat.values()) > 0.99  # all but biases/norms/pos


def test_a_dimension_its_mesh_axes_do_not_divide_is_replicated():
  """fsdp 8 divides 64 but not 12 (a small stem's channels): that dimension is replicated,
  the other keeps its axis, and the array can be placed."""
  mesh = jax.make_mesh((1, 8, 1), sharding.MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=jax.devices()[:8])
  rules = (("embed", "fsdp"), ("mlp", "tensor"))
  box = lambda shape: nn.Partitioned(jax.ShapeDtypeStruct(shape, "float32"), ("embed", "mlp"))
  shardings = sharding.logical_shardings({"even": box((64, 4)), "odd": box((12, 4))}, mesh,
                                         rules)
  assert shardings["even"].spec == P("fsdp", "tensor")
  assert shardings["odd"].spec == P(None, "tensor")
  placed = jax.device_put(jax.numpy.zeros((12, 4)), shardings["odd"])
  assert placed.addressable_shards[0].data.shape == (12, 4)
