"""Classifier-free guidance (Ho & Salimans 2022): conditional and unconditional
predictions from one batched forward pass, ε̃ = ε_u + s·(ε_c - ε_u), with two
optional refinements:

  rescale φ   (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps
              are Flawed", §3.4): the guided prediction is rescaled so that its
              per-example standard deviation equals the conditional prediction's,
              then mixed with the unrescaled one, φ·rescaled + (1-φ)·guided.
  interval    (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval
              Improves Sample and Distribution Quality"): guidance only where the
              model time lies in [lo, hi]; the plain conditional prediction elsewhere.
"""

import jax
import jax.numpy as jnp
import numpy as np


def rescale_guided(guided, cond, phi: float):
  """φ-mix of `guided` and `guided` rescaled to `cond`'s per-example std (all
  non-batch axes; diffusers' `rescale_noise_cfg`)."""
  if phi == 0.0:
    return guided
  axes = tuple(range(1, guided.ndim))
  ratio = jnp.std(cond, axis=axes, keepdims=True) / jnp.std(guided, axis=axes, keepdims=True)
  return phi * (guided * ratio) + (1.0 - phi) * guided


def in_interval(t, interval):
  """(B,) bool: model times inside the closed interval (lo, hi); all True if empty."""
  if not interval:
    return jnp.ones(jnp.shape(t), bool)
  lo, hi = interval
  return (t >= lo) & (t <= hi)


def null_condition(labels, null_label):
  """The unconditional counterpart of a batch's condition: `null_label` an int (the
  null class of (B,) labels), or a pytree shaped like one example of `labels` (e.g.
  a text model's empty-prompt tokens or embeddings), broadcast over the batch."""
  if isinstance(null_label, (int, np.integer)):
    return jnp.full_like(labels, null_label)
  return jax.tree_util.tree_map(
      lambda null, cond: jnp.broadcast_to(jnp.asarray(null, cond.dtype), cond.shape),
      null_label, labels)


def guided_model_fn(apply_fn, labels, null_label, scale: float, guided_channels: int,
                    rescale: float = 0.0, interval=()):
  """Wraps `apply_fn(x, model_time, labels)` into `model_fn(x, model_time)`.

  `labels` is the batch's condition: (B,) class labels with `null_label` the null
  class, or any pytree of (B, ...) arrays (text tokens / embeddings) with `null_label`
  one example's unconditional counterpart (see `null_condition`).

  With scale == 1 it is the plain conditional model. Otherwise the batch is doubled
  ([cond | uncond]) and the first `guided_channels` output channels are guided (and
  rescaled by `rescale` = φ, 0 = off); any further channels (a learned variance) come
  from the conditional half, as in DiT. With `interval` = (lo, hi), examples whose
  model time lies outside it get the conditional prediction; when no example of the
  batch lies inside, a `lax.cond` runs only the conditional forward (one compiled
  program either way).
  """
  if scale == 1.0:
    return lambda x, t: apply_fn(x, t, labels)
  interval = tuple(interval or ())
  null = null_condition(labels, null_label)

  def guided_fn(x, t):
    both = apply_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                    jax.tree_util.tree_map(lambda c, u: jnp.concatenate([c, u]), labels, null))
    cond, uncond = jnp.split(both, 2)
    c, u = cond[..., :guided_channels], uncond[..., :guided_channels]
    guided = rescale_guided(u + scale * (c - u), c, rescale)
    if interval:
      inside = in_interval(t, interval).reshape((-1,) + (1,) * (c.ndim - 1))
      guided = jnp.where(inside, guided, c)
    return jnp.concatenate([guided, cond[..., guided_channels:]], axis=-1)

  if not interval:
    return guided_fn

  def model_fn(x, t):
    t = jnp.broadcast_to(t, (x.shape[0],))
    return jax.lax.cond(jnp.any(in_interval(t, interval)), guided_fn,
                        lambda x, t: apply_fn(x, t, labels), x, t)

  return model_fn
