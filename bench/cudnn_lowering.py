"""Lowers each family's tiny train-step gradient with `attention_impl=cudnn` (bfloat16) for a
CUDA target on a machine without a GPU, and counts the cuDNN attention custom calls.

  PYTHONPATH=<cuda libs>:$PYTHONPATH python bench/cudnn_lowering.py [simvlm flamingo ...]

jax lowers for 'cuda' without a GPU, but the cuDNN attention rule asks cuDNN for its version
while tracing, so the CUDA plugin and cuDNN must be importable: `pip install --target DIR
jax-cuda12-plugin==<jax version> jax-cuda12-pjrt==<jax version> nvidia-cudnn-cu12
nvidia-cuda-runtime-cu12 nvidia-cublas-cu12` and put DIR on PYTHONPATH and its
nvidia/*/lib on LD_LIBRARY_PATH (the plugin itself then fails to start for lack of a GPU
and cuFFT, which lowering does not need). Nothing is compiled: that needs the GPU.
"""
import os
import re
import sys

import jax
import jax.numpy as jnp

from vlm_jax import config as config_lib
from vlm_jax.models import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("simvlm", "flamingo", "cogagent", "minigpt_v2", "prismer")


def lower_for_cuda(name: str) -> str:
  config = config_lib.load_config_file(os.path.join(REPO, f"configs/{name}.py:tiny"))
  config.model.attention_impl = "cudnn"
  config.model.dtype = "bfloat16"
  model = registry.build(config.model)
  batch = registry.dummy_batch(config, 2)
  params = jax.eval_shape(model.init, jax.random.key(0), batch)["params"]
  loss = lambda p: jnp.sum(model.apply({"params": p}, batch).astype(jnp.float32))
  return jax.jit(jax.grad(loss)).trace(params).lower(lowering_platforms=("cuda",)).as_text()


def main():
  for name in sys.argv[1:] or FAMILIES:
    text = lower_for_cuda(name)
    calls = re.findall(r"custom_call @__cudnn\$(\w+)", text)
    counts = {c: calls.count(c) for c in sorted(set(calls))}
    print(f"{name}: {counts or 'no cuDNN attention calls'}", flush=True)


if __name__ == "__main__":
  main()
