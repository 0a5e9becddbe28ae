"""Our train step against the reference implementation's, at the same sizes, on this machine.

  python bench/vs_reference.py                       # every pair, 3 rounds, 10 steps each
  python bench/vs_reference.py --pairs flamingo --rounds 5 --cpus 0,1

Our side runs the bench config with `--options` appended (default `scan=False`: at 4
layers the unscanned stack compiles in seconds, and XLA:CPU copies a scanned stack's weights
out of the stacked arrays and writes/reads its stacked residuals at every layer of every
pass, about 7% of the Flamingo bench step; docs/performance.md). `--options ""` runs the
configs as shipped.

Pairs (our side: bench/reference/ours.py; the reference: bench/reference/*.py):
  flamingo    configs/flamingo.py:bench       vs open-flamingo 2.0.1 (Flamingo +
              FlamingoLMMixin around transformers MptForCausalLM + CLIPVisionModel)
  llama_lora  configs/minigpt_v2.py:bench LM  vs transformers LlamaForCausalLM + peft LoRA
  t5          configs/simvlm.py:bench,t5=True text path  vs transformers T5 (v1.1 layout)

Both sides train on the same batch (the first batch of our config's own data pipeline,
saved once), with the same optimizer settings (AdamW, the config's betas/eps/weight decay,
gradient-norm clip), each in its own process, pinned to the same CPUs (`--cpus`, default
the first two; torch gets one thread per CPU), alternating ours, reference, ours, ... for
`--rounds` rounds. Each process compiles (ours) / builds, runs 2 warm-up steps, then times
`--steps` steps. The table gives the median over all timed steps of each side, the ratio
reference / ours (> 1: ours is faster), the median process CPU seconds per step, and the
load average before each run (the machine may be shared: read the figures with it).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
PAIRS = {
    "flamingo": ("configs/flamingo.py:bench", "open-flamingo 2.0.1 + transformers MPT/CLIP"),
    "llama_lora": ("configs/minigpt_v2.py:bench", "transformers Llama + peft LoRA"),
    "t5": ("configs/simvlm.py:bench,t5=True", "transformers T5 (v1.1 layout)"),
}
PAIR_KEYS = {  # batch keys each pair's two sides use
    "flamingo": None,  # all of them
    "llama_lora": ("tokens", "targets", "loss_mask", "token_mask", "loss_weight"),
    "t5": ("prefix_tokens", "prefix_mask", "tokens", "targets", "loss_mask", "loss_weight"),
}


def _optimizer_sizes(config) -> dict:
  o = config.optimizer
  return {"learning_rate": o.learning_rate, "b1": o.b1, "b2": o.b2, "eps": o.eps,
          "weight_decay": o.weight_decay, "grad_clip_norm": o.grad_clip_norm}


def pair_sizes(pair: str, config) -> dict:
  """What the reference needs to build the same model: our family's built modules (their
  defaults included) and the config's data and optimizer settings."""
  from vlm_jax.models import registry  # pylint: disable=g-import-not-at-top
  m, d = registry.build(config.model), config.data
  lm = m.lm  # a DecoderLM (flamingo, minigpt_v2) or SimVLM's TextConfig
  sizes = _optimizer_sizes(config)
  sizes.update(vocab_size=lm.vocab_size, width=lm.width, num_heads=lm.num_heads,
               mlp_dim=lm.mlp_dim)
  if pair == "flamingo":
    image_token, chunk_token = m.new_token_ids
    v, r = m.vision, m.resampler
    sizes.update(
        num_layers=lm.num_layers, length=d.sequence_length, vision_width=v.width,
        vision_layers=v.depth, vision_heads=v.num_heads, vision_mlp_dim=v.mlp_dim,
        patch_size=v.patch_size, image_size=d.image_size, resampler_layers=r.num_layers,
        num_latents=r.num_latents, resampler_heads=r.num_heads, resampler_head_dim=r.head_dim,
        xattn_every=lm.layers_per_unit, image_token=image_token, chunk_token=chunk_token)
  elif pair == "llama_lora":
    sizes.update(num_layers=lm.num_layers, num_kv_heads=lm.num_kv_heads or lm.num_heads,
                 length=d.sequence_length, norm_epsilon=lm.norm_epsilon,
                 lora_rank=lm.lora_rank, lora_alpha=lm.lora_alpha,
                 lora_dropout=lm.lora_dropout_rate)
  else:
    sizes.update(head_dim=lm.head_dim or lm.width // lm.num_heads,
                 encoder_layers=lm.encoder_layers, decoder_layers=lm.decoder_layers,
                 relative_buckets=lm.relative_buckets,
                 relative_max_distance=lm.relative_max_distance)
  return sizes


def _config(pair: str, options: str):
  from vlm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.load_config(_spec(pair, options), ())


def _spec(pair: str, options: str) -> str:
  """configs/...:size[,shipped options][,--options]"""
  spec = os.path.join(os.path.dirname(BENCH), PAIRS[pair][0])
  return f"{spec},{options}" if options else spec


def prepare(pair: str, workdir: str, options: str) -> None:
  """Saves the pair's batch (our pipeline's first batch) and sizes under workdir."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import train_step  # pylint: disable=g-import-not-at-top
  config = _config(pair, options)
  batch = train_step.pipeline_batch(config)
  keys = PAIR_KEYS[pair] or tuple(batch)
  np.savez(os.path.join(workdir, f"{pair}.npz"), **{k: batch[k] for k in keys})
  with open(os.path.join(workdir, f"{pair}.json"), "w") as f:
    json.dump(pair_sizes(pair, config), f)


def _load(pair: str, workdir: str):
  import numpy as np  # pylint: disable=g-import-not-at-top
  with np.load(os.path.join(workdir, f"{pair}.npz")) as data:
    batch = {k: data[k] for k in data.files}
  with open(os.path.join(workdir, f"{pair}.json")) as f:
    return batch, json.load(f)


def run_ours(pair: str, workdir: str, steps: int, options: str) -> dict:
  import train_step  # pylint: disable=g-import-not-at-top
  from reference import ours  # pylint: disable=g-import-not-at-top
  batch, _ = _load(pair, workdir)
  config = _config(pair, options)
  model, config.frozen = ours.model_and_frozen(pair, config)
  step = train_step.compile_step(config, batch, model)
  step.run(2)  # warm-up
  timed = step.run(steps)
  import jax  # pylint: disable=g-import-not-at-top
  sizes = [jax.tree.leaves(t) for t in (step.state.params, step.state.frozen)]
  return dict(timed, compile_s=step.compile_s,
              params_trainable=sum(x.size for x in sizes[0]),
              params_total=sum(x.size for x in sizes[0] + sizes[1]))


def run_reference(pair: str, workdir: str, steps: int, threads: int) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  batch, sizes = _load(pair, workdir)
  if pair == "flamingo":
    from reference import open_flamingo  # pylint: disable=g-import-not-at-top
    step, counts = open_flamingo.make_step(sizes, batch)
  else:
    from reference import hf_text  # pylint: disable=g-import-not-at-top
    make = hf_text.make_llama_lora_step if pair == "llama_lora" else hf_text.make_t5_step
    step, counts = make(sizes, batch)
  for _ in range(2):  # warm-up
    step()
  wall, cpu = [], []
  for _ in range(steps):
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    loss = step()
    wall.append(time.perf_counter() - start_wall)
    cpu.append(time.process_time() - start_cpu)
  return dict(counts, wall=wall, cpu=cpu, loss=float(loss), threads=torch.get_num_threads())


def worker(args) -> None:
  os.sched_setaffinity(0, args.cpus)
  if args.worker == "ours":
    result = run_ours(args.pair, args.dir, args.steps, args.options)
  else:
    result = run_reference(args.pair, args.dir, args.steps, len(args.cpus))
  print("RESULT " + json.dumps(result), flush=True)


def _spawn(side: str, pair: str, workdir: str, args) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--pair", pair,
         "--dir", workdir, "--steps", str(args.steps), "--options", args.options,
         "--cpus", ",".join(map(str, args.cpus))]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode or not lines:
    raise SystemExit(f"{side} worker for {pair} failed (exit {proc.returncode}):\n"
                     f"{proc.stderr[-3000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def _load_average() -> str:
  with open("/proc/loadavg") as f:
    return " ".join(f.read().split()[:3])


def compare(pair: str, workdir: str, args) -> dict:
  prepare(pair, workdir, args.options)
  runs = {"ours": [], "reference": []}
  for round_index in range(args.rounds):
    for side in ("ours", "reference"):
      load = _load_average()
      result = _spawn(side, pair, workdir, args)
      result["load_before"] = load
      runs[side].append(result)
      print(f"  {pair} round {round_index + 1} {side:9s} load {load}: median "
            f"{statistics.median(result['wall']):.3f} s (CPU {statistics.median(result['cpu']):.2f}"
            f" s), loss {result['loss']:.3f}", flush=True)
  summary = {"pair": pair, "reference_name": PAIRS[pair][1],
             "ours_config": os.path.relpath(_spec(pair, args.options), os.path.dirname(BENCH))}
  for side, results in runs.items():
    summary[side] = {
        "median_s": statistics.median(t for r in results for t in r["wall"]),
        "cpu_s": statistics.median(t for r in results for t in r["cpu"]),
        "run_medians_s": [round(statistics.median(r["wall"]), 3) for r in results],
        "loads": [r["load_before"] for r in results],
        "params_total": results[0]["params_total"],
        "params_trainable": results[0]["params_trainable"]}
  summary["ratio"] = summary["reference"]["median_s"] / summary["ours"]["median_s"]
  return summary


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--pairs", default=",".join(PAIRS))
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--cpus", default="0,1", help="CPUs both sides are pinned to")
  parser.add_argument("--options", default="scan=False",
                      help="config options appended to our side's bench config")
  parser.add_argument("--json", help="also write the summaries to this file")
  parser.add_argument("--worker", choices=("ours", "reference"), help=argparse.SUPPRESS)
  parser.add_argument("--pair", help=argparse.SUPPRESS)
  parser.add_argument("--dir", help=argparse.SUPPRESS)
  args = parser.parse_args()
  args.cpus = [int(c) for c in args.cpus.split(",")]
  if args.worker:
    return worker(args)
  pairs = [p for p in args.pairs.split(",") if p]
  unknown = set(pairs) - set(PAIRS)
  if unknown:
    raise SystemExit(f"--pairs: unknown {sorted(unknown)}; expected among {list(PAIRS)}")
  summaries = []
  with tempfile.TemporaryDirectory() as workdir:
    for pair in pairs:
      summaries.append(compare(pair, workdir, args))
  print("\n| pair | ours (median s/step) | reference (median s/step) | reference / ours | "
        "CPU s/step ours / ref | params total / trainable ours; ref | "
        "load before ours / ref runs |")
  print("|---|---|---|---|---|---|---|")
  for s in summaries:
    o, r = s["ours"], s["reference"]
    print(f"| `{s['ours_config']}` vs {s['reference_name']} | {o['median_s']:.3f} | "
          f"{r['median_s']:.3f} | **{s['ratio']:.2f}x** | {o['cpu_s']:.2f} / {r['cpu_s']:.2f} | "
          f"{o['params_total']:,} / {o['params_trainable']:,}; "
          f"{r['params_total']:,} / {r['params_trainable']:,} | "
          f"{'; '.join(a + ' / ' + b for a, b in zip(o['loads'], r['loads']))} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(summaries, f, indent=1)


if __name__ == "__main__":
  main()
