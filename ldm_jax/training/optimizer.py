"""Optax optimizer from `config.optim`: AdamW with linear warm-up (then constant or
cosine decay) and global-norm gradient clipping."""

import optax

from ldm_jax.errors import check

SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(optim_config, num_train_steps: int):
  warmup = int(optim_config.warmup_steps)
  peak = float(optim_config.learning_rate)
  check(optim_config.schedule in SCHEDULES,
        f"unknown optim.schedule {optim_config.schedule!r}; valid: {list(SCHEDULES)}")
  if optim_config.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 1),
                                              max(num_train_steps, warmup + 1))
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)],
      [max(warmup, 1)])


def make_optimizer(optim_config, num_train_steps: int) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW(lr schedule)."""
  check(optim_config.learning_rate > 0,
        f"optim.learning_rate must be > 0, got {optim_config.learning_rate}")
  parts = []
  if optim_config.grad_clip and optim_config.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim_config.grad_clip))
  parts.append(optax.adamw(learning_rate_schedule(optim_config, num_train_steps),
                           b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
                           weight_decay=optim_config.weight_decay))
  return optax.chain(*parts)
