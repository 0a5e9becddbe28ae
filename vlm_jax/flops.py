"""Analytic model FLOPs per example of a config, split by part, for MFU and sanity checks.

The family's model module counts its parts (`flops_parts(config, causal_half)`: forward
FLOPs per named part, e.g. 'vision', 'lm', 'logits', from the building blocks in
`nn/flops.py`) and says how training treats each (`flops_treatment(config)`: part -> rule;
parts it does not name train). Training cost applies DESIGN.md's rules per part: 3x forward
(6N) for trainable weights, 2x (4N) for frozen weights that gradients flow through, 1x (2N)
for frozen weights behind a stop-gradient.
"""
from vlm_jax.models import registry
from vlm_jax.nn.flops import FROZEN_PASSTHROUGH, FROZEN_STOPGRAD, TRAIN_MULTIPLIER, TRAINABLE

__all__ = ["FROZEN_PASSTHROUGH", "FROZEN_STOPGRAD", "TRAINABLE", "config_treatment",
           "flops_per_example", "forward_parts", "train_flops"]


def forward_parts(config, causal_half=True) -> dict:
  """Forward FLOPs per example per part. causal_half: count causal self-attention scores at
  half (MFU convention); False matches what XLA computes (full masked matmuls)."""
  return registry.load(config.model.name).flops_parts(config, causal_half)


def config_treatment(config) -> dict:
  """Part -> training rule (the family's `flops_treatment`; none: every part trainable)."""
  treatment = getattr(registry.load(config.model.name), "flops_treatment", None)
  return treatment(config) if treatment else {}


def train_flops(parts: dict, treatment: dict | None = None) -> float:
  """Sum of forward FLOPs x 3/2/1 per part; `treatment` maps part -> TRAINABLE |
  FROZEN_PASSTHROUGH | FROZEN_STOPGRAD (missing parts are trainable)."""
  treatment = treatment or {}
  return sum(f * TRAIN_MULTIPLIER[treatment.get(name, TRAINABLE)] for name, f in parts.items())


def flops_per_example(config, treatment=None, causal_half=True) -> dict:
  """{'forward', 'train', 'parts'}; treatment: part -> rule, e.g. `config_treatment(config)`;
  None: every part trainable."""
  parts = forward_parts(config, causal_half)
  return {"forward": sum(parts.values()), "train": train_flops(parts, treatment),
          "parts": parts}
