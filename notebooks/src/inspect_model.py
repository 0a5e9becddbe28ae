# %% [markdown]
# # Inspect a model
# Parameters by module (total, trainable, frozen, sharding), FLOPs per example, the attention
# masks each family builds, gate values and adaptor norms. Everything here uses
# `jax.eval_shape` or a tiny config, so it runs on a CPU runtime.
#
# Parameters: `VLM_NB_FAMILIES` (comma-separated family names, default every config in
# configs/), `VLM_NB_SIZE` (config size, default `tiny`), `VLM_NB_WORKDIRS`
# (`family=workdir,...`: read that run's latest checkpoint; default a fresh tiny model).

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
from vlm_jax import params as params_lib
from vlm_jax.inspection import data as data_insp
from vlm_jax.inspection import model as model_insp
from vlm_jax.inspection import run as run_insp
from vlm_jax.models import registry

# Families shown: every config in configs/ (a new family's config adds it here).
FAMILIES = common.env_list("VLM_NB_FAMILIES", ",".join(common.families()))
SIZE = os.environ.get("VLM_NB_SIZE", "tiny")
# family=workdir pairs: read that run's latest checkpoint instead of a fresh initialisation.
WORKDIRS = dict(item.split("=", 1) for item in common.env_list("VLM_NB_WORKDIRS", ""))
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
# ## Attention masks
# The masks each family draws for the first training example of its tiny config (its model
# module's `attention_masks`): SimVLM's PrefixLM masks (and the same model read as one
# decoder-only PrefixLM), the media each Flamingo token sees (text before the first image
# sees none), CogAgent's causal LM mask, its high-resolution cross-module (every token sees
# every high-res token) and the image slots its visual expert routes. White = may attend.

# %% tags=["plot"]
for family in FAMILIES:
  config = common.family_config(family, "tiny")
  (batch,), _ = data_insp.read_batches(config, batch_size=1)
  masks = model_insp.attention_masks(config, batch)
  if not masks:
    print(f"{family}: draws no masks (no `attention_masks` in its model module)")
    continue
  fig, axes = plt.subplots(1, len(masks), figsize=(4 * len(masks), 4), squeeze=False)
  for ax, (name, mask) in zip(axes[0], masks.items()):
    ax.imshow(mask, cmap="gray", aspect="auto", interpolation="nearest", vmin=0, vmax=1)
    ax.set_title(f"{family}: {name}", fontsize=8)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
  fig.tight_layout()
  plt.show()

# %% [markdown]
# ## Gates and adaptors
# tanh(gate) of every gated cross-attention block per layer (Flamingo: gates start at exactly
# 0, so an untrained model is the bare LM; training opens them) and the L2 norm of each
# bottleneck adaptor's weights per layer (Prismer), for every family that has them. Fresh
# tiny models unless `VLM_NB_WORKDIRS` names a run for the family.

# %% tags=["plot"]
def params_for(family: str):
  """(params, where from): the family's run's latest checkpoint, or a fresh tiny model."""
  workdir = WORKDIRS.get(family, "")
  if workdir:
    step, params = run_insp.latest_params(workdir)
    return params, f"{workdir} step {step}"
  config = common.family_config(family, "tiny")
  model = registry.build(config.model)
  variables = jax.jit(lambda rng: model.init(rng, registry.dummy_batch(config, 1)))(
      jax.random.key(0))
  return params_lib.strip_boxes(variables["params"]), "fresh initialisation"


for family in FAMILIES:
  params, origin = params_for(family)
  views = {"tanh(gate)": model_insp.gate_values(params),
           "||adaptor weights||": model_insp.adaptor_norms(params)}
  views = {name: values for name, values in views.items() if values}
  if not views:
    print(f"{family}: no gates or adaptors")
    continue
  fig, axes = plt.subplots(1, len(views), figsize=(6 * len(views), 3), squeeze=False)
  for ax, (name, values) in zip(axes[0], views.items()):
    for path, per_layer in values.items():
      ax.plot(range(len(per_layer)), per_layer, "o-", label=path)
    ax.set_xlabel("layer")
    ax.set_ylabel(name)
    ax.set_title(f"{family} ({origin})", fontsize=8)
    ax.legend(fontsize=6)
  plt.show()
