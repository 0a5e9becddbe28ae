"""Our side of each comparison: the model a reference implementation is compared with.

flamingo:   the family model of configs/flamingo.py:bench, as `vlm-train` builds it.
llama_lora: the LM path of configs/minigpt_v2.py:bench (a LLaMA-style `DecoderLM` with LoRA
            on query/value, the base frozen) over the batch's token sequence: what
            transformers' `LlamaForCausalLM` + peft LoRA is compared with.
t5:         SimVLM's text path in T5 v1.1 layout (configs/simvlm.py:bench,t5=True): encoder
            over the text prefix, decoder over the suffix, no image tokens (T5 has none).
"""
import flax.linen as nn
import jax.numpy as jnp

from vlm_jax.models import minigpt_v2, registry, simvlm
from vlm_jax.nn import attention, decoder_lm, transformer


class LmPath(nn.Module):
  """A family's `DecoderLM` alone, over `tokens` with `token_mask` (params under `lm/`)."""
  lm: decoder_lm.DecoderLM

  def __call__(self, batch, deterministic: bool = True):
    return self.lm(batch["tokens"], token_mask=batch["token_mask"], deterministic=deterministic)


class TextOnlySimVLM(simvlm.SimVLM):
  """SimVLM whose encoder sees the text prefix only (no image embedder params)."""

  def encode(self, batch, deterministic: bool = True):
    prefix_tokens = batch["prefix_tokens"]
    x = self.token_embedder(prefix_tokens)
    if self.lm.position == "learned":
      x = x + self.prefix_pos_embedding()[:prefix_tokens.shape[1]].astype(x.dtype)
    valid = batch["prefix_mask"] > 0
    bias = None
    if self.lm.position == "relative":
      order = jnp.arange(x.shape[1])
      bias = self.encoder_relative_bias(order[None], order)
    context = transformer.LayerContext(mask=attention.padding_mask(None, valid), bias=bias)
    return self.encoder_norm(self.encoder(x, context, deterministic)), valid


def model_and_frozen(pair: str, config):
  """(flax module, frozen-parameter regexes) of our side of `pair`."""
  module = registry.build(config.model)
  if pair == "flamingo":
    return module, tuple(config.frozen)
  if pair == "llama_lora":
    lm_frozen = tuple(p for p in minigpt_v2.frozen_patterns() if p.startswith("lm/"))
    return LmPath(module.lm), lm_frozen
  if pair == "t5":
    return TextOnlySimVLM(**{f: getattr(module, f) for f in registry.fields_of(type(module))}), ()
  raise ValueError(f"unknown pair {pair!r}")
