"""Exponential moving average of parameters (sampling uses the EMA weights).

With `warmup`, the decay ramps as min(decay, (1 + step) / (10 + step)) so early EMA
weights are not dominated by the random initialisation."""

import jax
import jax.numpy as jnp


def ema_decay(step, decay: float, warmup: bool):
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema_params, params, decay):
  """ema <- decay * ema + (1 - decay) * params, leaf by leaf."""
  return jax.tree_util.tree_map(lambda e, p: e + (1.0 - decay) * (p - e), ema_params, params)
