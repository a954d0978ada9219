"""The one process interface (SiT's view: x_t = α(t)·x0 + σ(t)·ε).

Every process provides:
  sample_time(rng, batch)            training times t, shape (B,)
  model_time(t)                      the value fed to the denoiser's time embedding
  add_noise(x0, noise, t)            x_t
  target(x0, noise, t)               what the denoiser regresses
  loss(model_fn, x0, rng, draws=None) per-example loss (B,) and the metrics dict; the
                                     (t, ε) it trains on are `training_draws(process,
                                     rng, x0)` unless `draws` gives them (gradient
                                     accumulation draws once for the whole batch)
where `model_fn(x_t, model_time) -> output` closes over params and conditioning.
Samplers live in `samplers.py` and take a process and a model_fn.
"""

import jax

from ldm_jax.errors import check


def build_process(diffusion_config, image_size: int | None = None):
  """Returns a `GaussianDiffusion` or `RectifiedFlow` from `config.diffusion`
  (`image_size` resolves rectified flow's resolution-dependent shift)."""
  from ldm_jax.diffusion.flow import RectifiedFlow
  from ldm_jax.diffusion.gaussian import GaussianDiffusion
  kinds = {"gaussian": GaussianDiffusion.from_config, "flow": RectifiedFlow.from_config}
  check(diffusion_config.process in kinds,
        f"unknown diffusion.process {diffusion_config.process!r}; valid: {sorted(kinds)}")
  if diffusion_config.process == "flow":
    return RectifiedFlow.from_config(diffusion_config, image_size)
  return GaussianDiffusion.from_config(diffusion_config)


def mean_flat(x):
  """Mean over all axes but the batch axis."""
  return x.reshape(x.shape[0], -1).mean(axis=1)


def training_draws(process, rng, x0):
  """The (t, ε) a process's training loss draws from `rng` for the batch `x0`."""
  t_rng, n_rng = jax.random.split(rng)
  return process.sample_time(t_rng, x0.shape[0]), jax.random.normal(n_rng, x0.shape, x0.dtype)
