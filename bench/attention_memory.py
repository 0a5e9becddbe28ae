"""Per-device memory of a scanned stack of attention layers' gradient, XLA vs splash, by length.

  python bench/attention_memory.py [--lengths 256,512,1024,2048,4096] [--batch 16]
                                   [--heads 16] [--head-dim 64] [--topology v5p:2x2x1]

Each layer projects x [B, T, D] to q, k, v, attends (causal, padding masked as keys: a
decoder LM's mask, `segment_mask.causal`) and projects back, residually; 4 layers under
`lax.scan`, as the models stack them. The gradient with respect to the weights and x is
compiled ahead of time for one TPU chip of `--topology` (no TPU needed) and XLA's
temporaries are printed: where the kernel starts to pay for its block padding and copies. A
program that does not fit the chip is reported with XLA's figure, and the other still measured.
"""
import argparse
import os
import re

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from vlm_jax import aot  # pylint: disable=g-import-not-at-top,wrong-import-position
from vlm_jax.nn import fused_attention, segment_mask  # pylint: disable=wrong-import-position

LAYERS = 4
GIB = 2**30


def temporaries(implementation: str, batch: int, length: int, heads: int, head_dim: int,
                device) -> int | str:
  """XLA's temporary bytes, or why the program does not fit the chip."""
  width = heads * head_dim

  def loss(weights, x, valid):
    mask = segment_mask.causal(length, valid)
    def layer(x, w):
      q, k, v = (jnp.einsum("BTD,DNH->BTNH", x, w[i]) for i in range(3))
      out = fused_attention.dot_product_attention(q, k, v, mask, scale=head_dim ** -0.5,
                                                  implementation=implementation)
      return x + jnp.einsum("BTNH,DNH->BTD", out, w[3]), None
    x, _ = jax.lax.scan(layer, x, weights)
    return jnp.sum(x * x)

  # A mesh of the one chip: its platform (tpu) selects the compiled kernel, not interpret mode.
  mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=[device],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  args = (jax.ShapeDtypeStruct((LAYERS, 4, width, heads, head_dim), jnp.float32,
                               sharding=sharding),
          jax.ShapeDtypeStruct((batch, length, width), jnp.float32, sharding=sharding),
          jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=sharding))
  with jax.set_mesh(mesh):
    try:
      compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
    except Exception as e:  # pylint: disable=broad-except
      if not aot.out_of_memory(e):
        raise
      # "... HLO temporaries (115.83G) exceeds available HBM (95.74G)." (libtpu's message)
      used = re.search(r"temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", str(e))
      return (f"does not fit: needs {used[1]} GiB of {used[2]}" if used else
              f"does not fit: {str(e).splitlines()[0][:200]}")
  assert implementation == "xla" or "tpu_custom_call" in compiled.as_text()
  return compiled.memory_analysis().temp_size_in_bytes


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--lengths", default="256,512,1024,2048,4096")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--topology", default="v5p:2x2x1")
  args = parser.parse_args()
  device = aot.topology_devices(args.topology)[0]
  print(f"{LAYERS} scanned layers, batch {args.batch}, {args.heads} heads x {args.head_dim}, "
        f"f32, one {device.device_kind}")
  print("| T = S | XLA temporaries | splash temporaries | splash / XLA |")
  print("|---|---|---|---|")
  for length in (int(n) for n in args.lengths.split(",")):
    xla, splash = (temporaries(impl, args.batch, length, args.heads, args.head_dim, device)
                   for impl in ("xla", "splash"))
    ratio = f"{splash / xla:.2f}" if isinstance(xla, int) and isinstance(splash, int) else ""
    print(f"| {length} | {_cell(xla)} | {_cell(splash)} | {ratio} |", flush=True)


def _cell(temporary: int | str) -> str:
  return f"{temporary / GIB:.2f} GiB" if isinstance(temporary, int) else temporary


if __name__ == "__main__":
  main()
