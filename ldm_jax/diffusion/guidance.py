"""Classifier-free guidance (Ho & Salimans 2022): conditional and unconditional
predictions from one batched forward pass, ε̃ = ε_u + s·(ε_c - ε_u)."""

import jax.numpy as jnp


def guided_model_fn(apply_fn, labels, null_label: int, scale: float, guided_channels: int):
  """Wraps `apply_fn(x, model_time, labels)` into `model_fn(x, model_time)`.

  With scale == 1 (or no null class) it is the plain conditional model. Otherwise
  the batch is doubled ([cond | uncond]) and the first `guided_channels` output
  channels are guided; any further channels (a learned variance) come from the
  conditional half, as in DiT.
  """
  if scale == 1.0:
    return lambda x, t: apply_fn(x, t, labels)

  def model_fn(x, t):
    both = apply_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                    jnp.concatenate([labels, jnp.full_like(labels, null_label)]))
    cond, uncond = jnp.split(both, 2)
    guided = uncond[..., :guided_channels] + scale * (
        cond[..., :guided_channels] - uncond[..., :guided_channels])
    return jnp.concatenate([guided, cond[..., guided_channels:]], axis=-1)

  return model_fn
