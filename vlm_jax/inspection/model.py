"""What a model is: parameter tables, the attention masks it builds, gate/adaptor values."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vlm_jax import flops as flops_lib
from vlm_jax.cli import info
from vlm_jax.nn import attention, decoder_lm, gated_xattn


# ----------------------------------------------------------------------------------------
# Parameters and FLOPs
# ----------------------------------------------------------------------------------------
def param_rows(config, num_devices: int) -> tuple[list, dict]:
  """Rows (module, total, trainable, frozen, sharding summary) per top-level module, and
  vlm-info's full description (eval_shape only: no allocation)."""
  described = info.describe(config, num_devices)
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
  counted = flops_lib.flops_per_example(config.model, config.data)
  rows = [(name, f"{value:.3e}") for name, value in counted["parts"].items()]
  return rows + [("forward", f"{counted['forward']:.3e}"), ("train", f"{counted['train']:.3e}")]


# ----------------------------------------------------------------------------------------
# Attention masks, built by the same functions the models call ([T, S] bool for example 0)
# ----------------------------------------------------------------------------------------
def simvlm_masks(image_tokens: int, prefix_valid, suffix_valid) -> dict:
  """SimVLM's encoder self, decoder self and decoder cross masks, and the same model seen as
  one decoder-only PrefixLM over [image ; prefix ; suffix] (decoder_lm.prefix_lm_mask)."""
  prefix_valid = jnp.asarray(prefix_valid, bool)[None]
  suffix_valid = jnp.asarray(suffix_valid, bool)[None]
  encoder_valid = jnp.concatenate([jnp.ones((1, image_tokens), bool), prefix_valid], axis=1)
  causal = jnp.concatenate([jnp.zeros_like(encoder_valid), jnp.ones_like(suffix_valid)], axis=1)
  all_valid = jnp.concatenate([encoder_valid, suffix_valid], axis=1)
  masks = {
      "encoder self-attention": attention.padding_mask(None, encoder_valid),
      "decoder self-attention": attention.causal_mask(suffix_valid.shape[1])
                                & attention.padding_mask(None, suffix_valid),
      "decoder cross-attention": attention.padding_mask(None, encoder_valid),
      "as one PrefixLM": decoder_lm.prefix_lm_mask(causal)
                         & attention.padding_mask(None, all_valid),
  }
  # Padding masks hold one row for every query: draw them at their [queries, keys] size.
  queries = {"encoder self-attention": encoder_valid.shape[1],
             "decoder self-attention": suffix_valid.shape[1],
             "decoder cross-attention": suffix_valid.shape[1],
             "as one PrefixLM": all_valid.shape[1]}
  return {k: np.broadcast_to(np.asarray(m[0, 0]), (queries[k], m.shape[-1]))
          for k, m in masks.items()}


def flamingo_media_mask(batch, example: int = 0, only_immediate: bool = True) -> np.ndarray:
  """[T, N] bool: token t cross-attends to media item n (gated_xattn.media_visibility)."""
  visible = gated_xattn.media_visibility(
      jnp.asarray(batch["image_positions"][example:example + 1]),
      jnp.asarray(batch["image_mask"][example:example + 1]), batch["tokens"].shape[1],
      only_immediate)
  return np.asarray(visible[0])


def cogagent_masks(batch, high_res_tokens: int, image_slots: int, example: int = 0) -> dict:
  """CogAgent's LM self-attention mask (causal over [BOS ; image slots ; text], padding
  masked), the cross-module's mask (every token sees every high-res token) and which
  positions the visual expert routes (image slots)."""
  token_mask = jnp.asarray(batch["token_mask"][example:example + 1]) > 0
  length = token_mask.shape[1]
  self_mask = attention.causal_mask(length) & attention.padding_mask(None, token_mask)
  start = int(batch["image_positions"][example, 0])
  is_vision = np.zeros(length, bool)
  is_vision[start:start + image_slots] = batch["image_mask"][example, 0] > 0
  return {"LM self-attention": np.asarray(self_mask[0, 0]),
          "cross-module (high-res)": np.ones((length, high_res_tokens), bool),
          "visual expert routing": is_vision}


# ----------------------------------------------------------------------------------------
# Parameter values of interest
# ----------------------------------------------------------------------------------------
def flat_params(params) -> dict:
  return traverse_util.flatten_dict(jax.device_get(params), sep="/")


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
