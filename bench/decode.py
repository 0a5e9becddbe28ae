"""Decoding throughput (generated tokens / s) with the KV cache and by full recomputation.

  python bench/decode.py configs/simvlm.py:tiny configs/minigpt_v2.py:tiny --batch 8 --new 24

Random weights, prompts from the config's first held-out generation task (vlm_jax.evaluation),
one device. Cached: `vlm_jax.decode.generate` (greedy; EOS disabled so every row generates
`--new` tokens), one jitted program: prefill + scanned single-token steps. Full
recomputation: a jitted full forward over the whole fixed-length sequence per new token
(encoder included for encoder-decoder families), argmax at each row's next position. Both
times are medians of warm runs (compilation excluded), blocking on the result only.
"""
import argparse
import json
import statistics
import time

import absl.flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax import config as config_lib
from vlm_jax import decode
from vlm_jax.evaluation import heldout, tasks
from vlm_jax.models import registry


def prompts(config, batch_size):
  name = next(n for n in tasks.tasks_for(config.data) if tasks.TASKS[n].kind == "generate")
  examples = heldout.load_examples(config.data, tasks.TASKS[name].source, batch_size)
  inputs = [heldout.as_prompt(e)[0] for e, _ in examples]
  inputs += [inputs[-1]] * (batch_size - len(inputs))
  return heldout.stack(inputs)


def full_recompute(model, params, batch, new):
  """A function giving greedy tokens [B, new] by re-running the whole forward for every
  token (no cache); its jitted step is compiled once."""
  encoder_decoder = "prefix_tokens" in batch
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  if encoder_decoder:
    tokens = jnp.full((batch["prefix_tokens"].shape[0], new), decode.BOS_ID, jnp.int32)
    start = jnp.zeros(tokens.shape[0], jnp.int32)
  else:
    length = batch["tokens"].shape[1]
    start = batch["token_mask"].sum(1).astype(jnp.int32) - 1
    tokens = jnp.zeros((batch["tokens"].shape[0], length + new), jnp.int32)
    tokens = tokens.at[:, :length].set(batch["tokens"])

  @jax.jit
  def step(params, batch, tokens, i):
    rows = jnp.arange(tokens.shape[0])
    b = dict(batch, tokens=tokens)
    if encoder_decoder:
      b["loss_mask"] = jnp.ones(tokens.shape, jnp.float32)
      write = jnp.minimum(i + 1, tokens.shape[1] - 1)
    else:
      # token_mask for decoder-only families, loss_mask for a decoder prompt (Prismer).
      b["token_mask"] = b["loss_mask"] = (
          jnp.arange(tokens.shape[1])[None] <= (start + i)[:, None]).astype(jnp.float32)
      write = start + i + 1
    logits = model.apply({"params": params}, b)
    nxt = jnp.argmax(logits[rows, start + i], axis=-1).astype(jnp.int32)
    return tokens.at[rows, write].set(nxt), nxt

  def run():
    current, out = tokens, []
    for i in range(new):
      current, nxt = step(params, batch, current, jnp.int32(i))
      out.append(nxt)
    return jnp.stack(out, axis=1)
  return run


def timed(fn, repeats):
  jax.block_until_ready(fn())  # compile + warm
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("configs", nargs="+")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--new", type=int, default=24)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  absl.flags.FLAGS.mark_as_parsed()
  for spec in args.configs:
    config = config_lib.load_config(spec, [])
    model = registry.build(config.model)
    batch = prompts(config, args.batch)
    new = min(args.new, config.data.get("suffix_length", args.new))
    init = dict(batch)
    if "prefix_tokens" in batch:
      init.update(tokens=np.zeros((args.batch, new), np.int32),
                  loss_mask=np.ones((args.batch, new), np.float32))
    else:
      init["loss_mask"] = batch["token_mask"]
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), init))["params"]
    cached = lambda: decode.generate(model, params, batch, new, eos_id=-1).tokens
    full = full_recompute(model, params, batch, new)
    same = np.array_equal(np.asarray(cached()), np.asarray(full()))
    t_cached = timed(cached, args.repeats)
    t_full = timed(full, args.repeats)
    tokens = args.batch * new
    row = {"config": spec, "batch": args.batch, "new_tokens": new,
           "prompt_slots": int(batch.get("tokens", batch.get("prefix_tokens")).shape[1]),
           "cached_tokens_per_s": round(tokens / t_cached, 1),
           "full_recompute_tokens_per_s": round(tokens / t_full, 1),
           "speedup": round(t_full / t_cached, 2), "same_tokens": bool(same),
           "device": jax.devices()[0].device_kind}
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
