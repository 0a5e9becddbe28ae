# %% [markdown]
# # Inspect a model
# Parameters by module (total, trainable, frozen, sharding), the attention masks each family
# builds, Flamingo's gate values, Prismer's adaptor norms and FLOPs per example. Everything
# here uses `jax.eval_shape` or a tiny config, so it runs on a CPU runtime.
#
# Parameters: `VLM_NB_FAMILIES` (comma-separated family names, default all registered ones
# below), `VLM_NB_SIZE` (config size, default `tiny`), `VLM_NB_FLAMINGO_WORKDIR` /
# `VLM_NB_PRISMER_WORKDIR` (a workdir whose latest checkpoint to read; default: a freshly
# initialised tiny model).

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
from vlm_jax.inspection import model as model_insp
from vlm_jax.models import registry

# Families shown; a newly registered family is one more name here.
FAMILIES = common.env_list("VLM_NB_FAMILIES", "simvlm,minigpt_v2,cogagent,flamingo,prismer")
FAMILIES = [f for f in FAMILIES if f in registry.MODELS]
SIZE = os.environ.get("VLM_NB_SIZE", "tiny")
configs = {family: common.family_config(family, SIZE) for family in FAMILIES}
print("families:", ", ".join(FAMILIES))

# %% [markdown]
# ## Parameters by module
# Counts per top-level module; "sharding" lists how many parameter arrays map to each mesh
# layout under the config's logical axis rules (on this runtime's device count).

# %%
for family, config in configs.items():
  rows, described = model_insp.param_rows(config, jax.device_count())
  print(f"== {family} ({SIZE}); mesh {described['mesh']}")
  print(common.text_table(rows, ("module", "total", "trainable", "frozen", "sharding")))
  print()

# %% [markdown]
# ## FLOPs per example
# Analytic forward FLOPs per part (`vlm_jax.flops`) and the training total (3x trainable,
# 2x frozen pass-through, 1x frozen behind a stop-gradient).

# %% tags=["plot"]
fig, axes = plt.subplots(1, len(configs), figsize=(4 * len(configs), 3), squeeze=False)
for ax, (family, config) in zip(axes[0], configs.items()):
  rows = model_insp.flops_rows(config)
  print(f"== {family}\n" + common.text_table(rows, ("part", "FLOPs")))
  parts = rows[:-2]
  ax.barh([p for p, _ in parts], [float(f) for _, f in parts])
  ax.set_xscale("log")
  ax.set_title(f"{family}: forward FLOPs / example")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## SimVLM: PrefixLM masks
# The encoder sees [image tokens ; prefix] bidirectionally (padding masked as keys), the
# decoder is causal over the suffix and cross-attends to every valid encoder position. The
# last panel is the same model read as one decoder-only PrefixLM
# (`decoder_lm.prefix_lm_mask`). White = may attend.

# %% tags=["plot"]
config = common.family_config("simvlm", "tiny")
grid = config.data.image_size // 16  # the conv stem's stride
prefix = np.arange(config.data.prefix_length) < 5  # a 5-token prefix, the rest padding
suffix = np.arange(config.data.suffix_length) < 9
masks = model_insp.simvlm_masks(grid * grid, prefix, suffix)
fig, axes = plt.subplots(1, len(masks), figsize=(4 * len(masks), 4))
for ax, (name, mask) in zip(axes, masks.items()):
  ax.imshow(mask, cmap="gray", interpolation="nearest")
  ax.set_title(name)
  ax.set_xlabel("key")
  ax.set_ylabel("query")
fig.suptitle(f"{grid * grid} image tokens, 5 of {config.data.prefix_length} prefix tokens, "
             f"9 of {config.data.suffix_length} suffix tokens")
plt.show()

# %% [markdown]
# ## Flamingo: media masking on a sample document
# Each token cross-attends only to the most recent image at or before it; text before the
# first image attends to nothing (its gated block adds exactly zero).

# %% tags=["plot"]
from vlm_jax.data.vocab import Vocab
from vlm_jax.inspection import data as data_insp

config = common.family_config("flamingo", "tiny")
(batch,), _ = data_insp.read_batches(config, batch_size=1)
visible = model_insp.flamingo_media_mask(batch)
length = int(batch["token_mask"][0].sum())
vocab = Vocab(config.data.vocab_path)
pieces = [vocab.decode([t]) or str(t) for t in batch["tokens"][0, :length]]
fig, ax = plt.subplots(figsize=(5, max(4, length * 0.12)))
ax.imshow(visible[:length], cmap="gray", aspect="auto", interpolation="nearest")
ax.set_yticks(range(length), pieces, fontsize=6)
ax.set_xticks(range(visible.shape[1]),
              [f"image {n}" + ("" if batch["image_mask"][0, n] else " (absent)")
               for n in range(visible.shape[1])], rotation=45)
ax.set_title("token -> media item it sees")
plt.show()

# %% [markdown]
# ## CogAgent: self-attention and the high-resolution cross-module
# The LM is causal over [BOS ; image slots ; text] and routes the image slots through the
# visual expert; every token cross-attends to every high-resolution token (no mask, no gate).

# %% tags=["plot"]
config = common.family_config("cogagent", "tiny")
(batch,), _ = data_insp.read_batches(config, batch_size=1)
m = config.model
slots = (config.data.image_size // m.patch_size) ** 2 + 2
high_res = (config.data.high_res_image_size // m.high_res_patch_size) ** 2
masks = model_insp.cogagent_masks(batch, high_res, slots)
fig, axes = plt.subplots(1, 3, figsize=(13, 4), gridspec_kw={"width_ratios": [4, 4, 1]})
axes[0].imshow(masks["LM self-attention"], cmap="gray", interpolation="nearest")
axes[1].imshow(masks["cross-module (high-res)"], cmap="gray", aspect="auto",
               interpolation="nearest", vmin=0, vmax=1)
axes[2].imshow(masks["visual expert routing"][:, None], cmap="Oranges", aspect="auto",
               interpolation="nearest")
for ax, name in zip(axes, masks):
  ax.set_title(name)
axes[1].set_xlabel(f"{high_res} high-res tokens")
plt.show()

# %% [markdown]
# ## Flamingo gate values
# tanh(gate) of every gated cross-attention block (attention and feed-forward), per layer.
# Gates start at exactly 0, so an untrained model is the bare LM; training opens them. With
# `VLM_NB_FLAMINGO_WORKDIR` unset this shows a freshly initialised tiny Flamingo (all zero).

# %% tags=["plot"]
from vlm_jax.inspection import run as run_insp


def params_for(family: str, workdir: str):
  """Params of `workdir`'s latest checkpoint, or of a freshly initialised tiny model."""
  config = (run_insp.run_config(workdir, "") if workdir and
            os.path.isfile(os.path.join(workdir, "config.json"))
            else common.family_config(family, "tiny"))
  if workdir:
    from vlm_jax.train import loop, state as state_lib
    trainer = loop.Trainer(config, workdir)
    step = trainer.checkpointer.latest_step()
    with trainer.mesh_context():
      state = trainer.checkpointer.restore(step, trainer.factory.abstract_with_shardings(),
                                           trainer.data)
    return state_lib.merge_params(state.params, state.frozen), f"{workdir} step {step}"
  model = registry.build(config.model)
  variables = jax.jit(lambda rng: model.init(rng, registry.dummy_batch(config, 1)))(
      jax.random.key(0))
  from vlm_jax.train import state as state_lib
  return state_lib.strip_boxes(variables["params"]), "fresh initialisation"


params, origin = params_for("flamingo", os.environ.get("VLM_NB_FLAMINGO_WORKDIR", ""))
gates = model_insp.gate_values(params)
fig, ax = plt.subplots(figsize=(6, 3))
for path, values in gates.items():
  ax.plot(range(len(values)), values, "o-", label=path.split("/")[-1] + " " + path.split("/")[-2])
ax.set_xlabel("layer (group)")
ax.set_ylabel("tanh(gate)")
ax.set_title(f"Flamingo gates ({origin})")
ax.legend(fontsize=7)
plt.show()

# %% [markdown]
# ## Prismer adaptor norms
# L2 norm of each bottleneck adaptor's weights per layer (vision encoder and decoder). Shown
# once the `prismer` family is registered (`VLM_NB_PRISMER_WORKDIR`: read a checkpoint).

# %% tags=["plot", "needs:prismer"]
if "prismer" not in registry.MODELS:
  print("the prismer family is not registered in this checkout; nothing to show")
else:
  params, origin = params_for("prismer", os.environ.get("VLM_NB_PRISMER_WORKDIR", ""))
  norms = model_insp.adaptor_norms(params)
  fig, ax = plt.subplots(figsize=(6, 3))
  for path, values in norms.items():
    ax.plot(range(len(values)), values, "o-", label=path)
  ax.set_xlabel("layer")
  ax.set_ylabel("||adaptor weights||")
  ax.set_title(f"Prismer adaptors ({origin})")
  ax.legend(fontsize=7)
  plt.show()
