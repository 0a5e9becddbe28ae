"""Learning-rate schedules, AdamW with a weight-decay mask, and global-norm clipping."""
import re

import optax
from flax import traverse_util


def learning_rate_schedule(opt_config, num_train_steps: int) -> optax.Schedule:
  """Linear warmup, then cosine or rsqrt decay (or constant)."""
  peak, warmup = opt_config.learning_rate, opt_config.warmup_steps
  warmup_fn = optax.linear_schedule(0.0, peak, max(warmup, 1))
  if opt_config.schedule == "cosine":
    decay_fn = optax.cosine_decay_schedule(
        peak, max(num_train_steps - warmup, 1), alpha=opt_config.end_lr_fraction)
  elif opt_config.schedule == "rsqrt":
    decay_fn = lambda step: peak * (max(warmup, 1) / (step + max(warmup, 1))) ** 0.5
  elif opt_config.schedule == "constant":
    decay_fn = optax.constant_schedule(peak)
  else:
    raise ValueError(f"config.optimizer.schedule={opt_config.schedule!r}: expected one of "
                     "'cosine', 'rsqrt', 'constant'.")
  return optax.join_schedules([warmup_fn, decay_fn], [warmup])


def path_matches(params, patterns) -> dict:
  """A tree of bools, True where the '/'-joined parameter path fully matches a pattern."""
  compiled = [re.compile(p) for p in patterns]
  flat = traverse_util.flatten_dict(params, sep="/")
  return traverse_util.unflatten_dict(
      {k: any(c.fullmatch(k) for c in compiled) for k in flat}, sep="/")


def make_optimizer(config) -> optax.GradientTransformation:
  opt = config.optimizer
  decay_mask = lambda params: _negate(path_matches(params, opt.no_decay))
  return optax.chain(
      optax.clip_by_global_norm(opt.grad_clip_norm) if opt.grad_clip_norm else optax.identity(),
      optax.adamw(
          learning_rate_schedule(opt, config.num_train_steps),
          b1=opt.b1, b2=opt.b2, eps=opt.eps,
          weight_decay=opt.weight_decay, mask=decay_mask),
  )


def _negate(tree):
  return {k: _negate(v) if isinstance(v, dict) else not v for k, v in tree.items()}
