# %% [markdown]
# # Inspect a run
# Point at a training workdir: loss, learning rate, gradient norm, throughput and MFU from
# its `metrics.jsonl`; where its time went (goodput) and its profiles; its checkpoints;
# captions generated from one of them for held-out images; and the decoder's
# cross-attention over the image for each generated token.
#
# Parameters: `VLM_NB_WORKDIR` (default: a short tiny SimVLM run is trained into
# `/tmp/vlm_nb_run` first), `VLM_NB_CONFIG` (`path.py:arg`, used when the workdir has no
# `config.json`), `VLM_NB_STEP` (checkpoint to load; default the latest), `VLM_NB_SAMPLES`.

# %%
# Setup. Colab: clones and installs vlm_jax (set VLM_JAX_SOURCE to a local checkout or another
# git URL); locally it is skipped when vlm_jax already imports. Nothing after this cell needs
# the network. Parameters are environment variables (CI sets them; the defaults suit Colab).
import importlib.util
import os
import subprocess
import sys

if importlib.util.find_spec("vlm_jax") is None:
  source = os.environ.get("VLM_JAX_SOURCE", "https://github.com/vlm-jax/vlm_jax.git")
  if not os.path.isdir(source):
    subprocess.run(["git", "clone", "--depth=1", source, "/content/vlm_jax"], check=True)
    source = "/content/vlm_jax"
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", f"{source}[notebooks]"],
                 check=True)
  sys.path.insert(0, source)
  os.environ.setdefault("VLM_JAX_REPO_DIR", source)

import jax
import matplotlib.pyplot as plt
import numpy as np

from vlm_jax.inspection import common

%matplotlib inline
platform = jax.devices()[0].platform
print(f"runtime: {platform.upper()} ({jax.device_count()} x {jax.devices()[0].device_kind}); "
      f"repository: {common.repo_dir()}")

# %%
from vlm_jax.inspection import run as run_insp

WORKDIR = os.environ.get("VLM_NB_WORKDIR", "")
CONFIG = os.environ.get("VLM_NB_CONFIG",
                        os.path.join(common.repo_dir(), "configs", "simvlm.py:tiny"))
SAMPLES = int(os.environ.get("VLM_NB_SAMPLES", "4"))
if not WORKDIR:  # a self-contained demo: a short run of the tiny SimVLM
  from vlm_jax.train import loop
  WORKDIR = "/tmp/vlm_nb_run"
  demo = run_insp.run_config(WORKDIR, CONFIG, [("num_train_steps", "200"),
                                                ("checkpoint.every_steps", "100")])
  loop.train(demo, WORKDIR)
  with open(os.path.join(WORKDIR, "config.json"), "w") as f:
    f.write(demo.to_json_best_effort(indent=2))
config = run_insp.run_config(WORKDIR, CONFIG)
metrics = run_insp.read_metrics(WORKDIR)
print(f"{WORKDIR}: {config.model.name}, {len(metrics['loss'][0])} logged steps; metrics: "
      + ", ".join(sorted(metrics)))

# %% [markdown]
# ## Training curves

# %% tags=["plot"]
panels = [("loss", "loss"), ("learning_rate", "learning rate"), ("grad_norm", "gradient norm"),
          ("examples_per_s", "examples / s"), ("mfu", "MFU")]
panels = [(key, title) for key, title in panels if key in metrics]
fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.8), squeeze=False)
for ax, (key, title) in zip(axes[0], panels):
  steps, values = metrics[key]
  ax.plot(steps, values, ".-")
  ax.set_title(title)
  ax.set_xlabel("step")
fig.tight_layout()
plt.show()
skipped = metrics.get("data/skipped_records", ([], [0]))[1][-1]
print(f"bad records skipped by the end of the run: {skipped:.0f}")

# %% [markdown]
# ## Where the time went
# Goodput accounts (`vlm_jax/train/goodput.py`): the run's wall time, restarts included, split
# into start-up, init/restore, compile, data wait, steps, checkpoints, evals, restarts and the
# time lost to steps a restart redid; and the profiles taken (`config.profile`).

# %% tags=["plot"]
from vlm_jax.train import goodput, profiling

accounts = run_insp.time_accounts(metrics)
if accounts:
  print(goodput.summary(accounts))
  shown = [c for c in goodput.CATEGORIES if accounts[c] > 0]
  fig, ax = plt.subplots(figsize=(8, 0.35 * len(shown) + 0.8))
  ax.barh(shown, [accounts[c] for c in shown])
  ax.invert_yaxis()
  ax.set_xlabel("seconds")
  ax.set_title(f"wall {accounts['wall']:.0f} s, "
               f"goodput {100 * accounts['step'] / accounts['wall']:.1f}%")
  fig.tight_layout()
  plt.show()
traces = profiling.traces(WORKDIR)
for path in traces:
  print(f"profile: {path}")
print(f"open them: tensorboard --logdir {WORKDIR}/tensorboard (Profile tab) or xprof --logdir "
      f"{WORKDIR}/tensorboard" if traces else "no profile: set config.profile.steps, e.g. "
      "--config.profile.steps='(10, 11)'")

# %% [markdown]
# ## Checkpoints

# %%
found = run_insp.checkpoints(WORKDIR)
for step, size in found:
  print(f"step {step}: {size / 2**20:.1f} MiB")
STEP = int(os.environ.get("VLM_NB_STEP", found[-1][0]))

# %% [markdown]
# ## Generations from a checkpoint
# Greedy generations for held-out examples beside the truth (the family's first generation
# task: captions for SimVLM, Prismer and Flamingo).

# %%
from vlm_jax import decode, params as params_lib, samples
from vlm_jax.data.vocab import Vocab
from vlm_jax.evaluation import heldout, tasks
from vlm_jax.inspection import data as data_insp
from vlm_jax.train import loop

trainer = loop.Trainer(config, WORKDIR)
with trainer.mesh_context():  # the weights only: a pod job saved one data state per process
  state = trainer.checkpointer.restore(STEP, trainer.factory.abstract_with_shardings())
print(f"loaded step {int(state.step)} from {trainer.checkpointer.directory}")
for truth, generated in samples.generate_captions(trainer, state, SAMPLES):
  print(f"truth: {truth!r}\n  generated: {generated!r}")

# %% [markdown]
# ## Cross-attention over the image
# For each generated token: the decoder's cross-attention weights on the image tokens
# (mean over heads and layers), upsampled onto the image. For encoder-decoder PrefixLM
# families (a batch with `prefix_tokens`: the encoder reads [image tokens ; prefix]).

# %% tags=["plot"]
task = tasks.get(samples.generation_task(config), config)
(example, _), = heldout.load_examples(config, task.source, 1, keep=task.keep)
vocab = Vocab(config.data.vocab_path)
if "prefix_tokens" not in example:
  print(f"{config.model.name}: its batch has no encoder prefix; these maps are of a PrefixLM "
        "encoder-decoder's cross-attention")
else:
  inputs, answer, _ = heldout.as_prompt(example, vocab.pad_id)
  batch, truths = heldout.stack([inputs]), [vocab.decode(answer)]
  params = params_lib.merge_params(state.params, state.frozen)
  with trainer.mesh_context():
    tokens = decode.generate(trainer.model, params, batch,
                             max_len=config.data.suffix_length, bos_id=vocab.bos_id,
                             eos_id=vocab.eos_id, pad_id=vocab.pad_id).tokens
    maps = run_insp.cross_attention_maps(trainer.model, params, batch, tokens, vocab.bos_id)
  image = data_insp.pixels(batch["images"][0, 0])
  grid = int(round((maps.shape[-1] - batch["prefix_tokens"].shape[1]) ** 0.5))
  ids = [int(t) for t in np.asarray(tokens[0])]
  shown = (ids.index(vocab.eos_id) + 1 if vocab.eos_id in ids else len(ids))
  shown = min(max(shown, 1), 8)
  fig, axes = plt.subplots(1, shown + 1, figsize=(2.2 * (shown + 1), 2.6))
  axes[0].imshow(image)
  axes[0].set_title("image", fontsize=8)
  for t, ax in enumerate(axes[1:]):
    weights = maps[0, :, t, :grid * grid].mean(axis=0).reshape(grid, grid)
    ax.imshow(image)
    ax.imshow(weights, cmap="jet", alpha=0.5, interpolation="bilinear",
              extent=(0, image.shape[1], image.shape[0], 0))
    ax.set_title(repr(vocab.decode([ids[t]]) or "<eos>"), fontsize=8)
  for ax in axes:
    ax.axis("off")
  fig.suptitle(f"truth: {truths[0]!r}", fontsize=8)
  plt.show()
