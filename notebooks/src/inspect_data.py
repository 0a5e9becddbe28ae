# %% [markdown]
# # Inspect data
# For each family's data (or a task / mixture you pick): a grid of examples as the model
# sees them (images with their text, interleaved documents in reading order with their
# images where the `<image>` tokens are, expert maps beside the RGB image, boxes drawn on the
# image), token counts, realised mixture proportions and bad-record counters.
#
# Parameters: `VLM_NB_FAMILIES` (comma-separated), `VLM_NB_MIXTURES` (`family=task or
# mixture,...`; default each config's own mixture), `VLM_NB_BATCH` (examples per family),
# `VLM_NB_RECORDS` (records read for proportions).

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
import textwrap

from vlm_jax.data import catalog, families
from vlm_jax.data.vocab import Vocab
from vlm_jax.inspection import data as data_insp

# Families shown: every config in configs/ (a new family's config adds it here).
FAMILIES = common.env_list("VLM_NB_FAMILIES", ",".join(common.families()))
MIXTURES = dict(item.split("=", 1) for item in common.env_list("VLM_NB_MIXTURES", ""))
BATCH = int(os.environ.get("VLM_NB_BATCH", "6"))
RECORDS = int(os.environ.get("VLM_NB_RECORDS", "2000"))

configs = {f: data_insp.with_mixture(common.family_config(f), MIXTURES.get(f, "")) for f in FAMILIES}
batches, skipped = {}, {}
for family, config in configs.items():
  batches[family], skipped[family] = data_insp.read_batches(config, BATCH, num_batches=2)
  module = families.load(family)
  print(f"{family}: mixture {config.data.mixture!r}; its tasks: "
        f"{', '.join(sorted(catalog.tasks(module)))}; its mixtures: "
        f"{', '.join(sorted(catalog.mixtures(module))) or 'none'}")

# %% [markdown]
# ## Examples
# One row per example, in reading order. Boxes written in the text (in the family's box
# format) are drawn on the image they refer to; expert maps (Prismer) follow the RGB image.


# %%
def draw_example(axes, pieces):
  """Images (with boxes and expert maps) and wrapped text, left to right."""
  for ax in axes:
    ax.axis("off")
  slot = 0
  for piece in pieces:
    if slot >= len(axes):
      break
    if piece[0] == "text":
      axes[slot].text(0, 0.5, textwrap.fill(piece[1], 40), fontsize=7, va="center",
                      transform=axes[slot].transAxes)
      slot += 1
      continue
    _, pixels, boxes, experts = piece
    axes[slot].imshow(pixels)
    for x0, y0, x1, y1 in boxes:
      axes[slot].add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False,
                                         edgecolor="red", linewidth=1.5))
    slot += 1
    for name, value in experts.items():
      if slot < len(axes):
        axes[slot].imshow(value, cmap="viridis")
        axes[slot].set_title(name, fontsize=7)
        slot += 1


# %% tags=["plot"]
for family, config in configs.items():
  vocab = Vocab(config.data.vocab_path)
  batch = batches[family][0]
  formats = families.box_format(family)
  layouts = [data_insp.example_layout(batch, i, vocab, formats) for i in range(BATCH)]
  columns = max(len(p) + sum(len(x[3]) for x in p if x[0] == "image") for p in layouts)
  fig, axes = plt.subplots(BATCH, columns, figsize=(2.6 * columns, 2.2 * BATCH), squeeze=False)
  for row, pieces in zip(axes, layouts):
    draw_example(row, pieces)
  fig.suptitle(f"{family}: {config.data.mixture}")
  plt.show()

# %% [markdown]
# ## Token counts
# Per example: input tokens (prefix + suffix for PrefixLM; real inputs, image slots included,
# otherwise) and tokens that carry loss.

# %% tags=["plot"]
fig, axes = plt.subplots(1, len(configs), figsize=(4 * len(configs), 3), squeeze=False)
for ax, family in zip(axes[0], configs):
  for name, counts in data_insp.token_counts(batches[family]).items():
    ax.hist(counts, bins=10, alpha=0.6, label=name)
  ax.set_title(family)
  ax.set_xlabel("tokens per example")
  ax.legend(fontsize=7)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Realised mixture proportions
# Share of each task over the first `VLM_NB_RECORDS` records of the mixed stream, beside the
# declared (normalised) rate.

# %% tags=["plot"]
fig, axes = plt.subplots(1, len(configs), figsize=(4 * len(configs), 3), squeeze=False)
for ax, (family, config) in zip(axes[0], configs.items()):
  rows = data_insp.realised_proportions(config, RECORDS)
  print(f"== {family}\n" + common.text_table(
      [(t, f"{r:.3f}", f"{s:.3f}") for t, r, s in rows], ("task", "rate", "realised")))
  y = np.arange(len(rows))
  ax.barh(y - 0.2, [r for _, r, _ in rows], height=0.4, label="rate")
  ax.barh(y + 0.2, [s for _, _, s in rows], height=0.4, label="realised")
  ax.set_yticks(y, [t for t, _, _ in rows], fontsize=7)
  ax.set_title(family)
  ax.legend(fontsize=7)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Bad records
# The pipeline's counters for the batches above (bad records are skipped and counted, never
# fatal below `data.max_bad_fraction`), and a per-task tally of the first records by the
# reason the family's processor gave ("ok" when usable).

# %%
for family, config in configs.items():
  print(f"== {family}: pipeline counters {skipped[family]}")
  tally = data_insp.bad_record_tally(config, min(RECORDS, 64))
  print(common.text_table([(t, r, n) for (t, r), n in sorted(tally.items())],
                          ("task", "outcome", "records")))
