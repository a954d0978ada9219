"""The one process interface (SiT's view: x_t = α(t)·x0 + σ(t)·ε).

Every process provides:
  sample_time(rng, batch)            training times t, shape (B,)
  model_time(t)                      the value fed to the denoiser's time embedding
  add_noise(x0, noise, t)            x_t
  target(x0, noise, t)               what the denoiser regresses
  loss(model_fn, x0, rng)            per-example loss (B,) and the metrics dict
where `model_fn(x_t, model_time) -> output` closes over params and conditioning.
Samplers live in `samplers.py` and take a process and a model_fn.
"""

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
