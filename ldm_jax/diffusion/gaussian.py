"""Discrete-time Gaussian diffusion (Ho et al. 2020; DDIM, Song et al. 2021).

x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε, t ∈ {0, …, T-1}. Prediction targets:
  epsilon  ε                               (DDPM, eq. 14 "L_simple")
  v        sqrt(ᾱ)·ε - sqrt(1-ᾱ)·x0         (Salimans & Ho 2022, "v-prediction")
  x0       x0                              (diffusers "sample")
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion import schedules
from ldm_jax.diffusion.process import mean_flat
from ldm_jax.errors import check

PREDICTIONS = ("epsilon", "v", "x0")


def _bcast(values, x):
  """(B,) -> (B, 1, 1, ...) to broadcast against x."""
  return values.reshape(values.shape + (1,) * (x.ndim - values.ndim))


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianDiffusion:
  """Discrete Gaussian diffusion with a fixed β schedule."""
  betas: np.ndarray
  prediction: str = "epsilon"

  def __post_init__(self):
    check(self.prediction in PREDICTIONS,
          f"unknown diffusion.prediction {self.prediction!r}; valid: {list(PREDICTIONS)}")

  @classmethod
  def from_config(cls, config):
    betas = schedules.make_betas(config.beta_schedule, config.num_timesteps,
                                 config.get("beta_start", 1e-4), config.get("beta_end", 0.02))
    return cls(betas=betas, prediction=config.prediction)

  @property
  def num_timesteps(self) -> int:
    return len(self.betas)

  @property
  def alphas_cumprod(self) -> np.ndarray:
    return schedules.alphas_cumprod(self.betas)

  def alpha_bar(self, t: jax.Array) -> jax.Array:
    """ᾱ_t for integer t; t < 0 gives 1 (the clean image)."""
    table = jnp.asarray(self.alphas_cumprod)
    return jnp.where(t >= 0, table[jnp.clip(t, 0, self.num_timesteps - 1)], 1.0)

  # -- the process interface -------------------------------------------------
  def sample_time(self, rng, batch: int) -> jax.Array:
    return jax.random.randint(rng, (batch,), 0, self.num_timesteps)

  def model_time(self, t: jax.Array) -> jax.Array:
    return t.astype(jnp.float32)

  def add_noise(self, x0, noise, t):
    abar = _bcast(self.alpha_bar(t), x0)
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1 - abar) * noise

  def target(self, x0, noise, t):
    if self.prediction == "epsilon":
      return noise
    if self.prediction == "x0":
      return x0
    abar = _bcast(self.alpha_bar(t), x0)
    return jnp.sqrt(abar) * noise - jnp.sqrt(1 - abar) * x0

  def predict_x0_eps(self, model_output, x_t, t=None, alpha_bar=None):
    """(x0, ε) implied by the model output at x_t (give t or ᾱ_t as (B,) or scalar)."""
    abar = self.alpha_bar(t) if alpha_bar is None else alpha_bar
    abar = _bcast(jnp.asarray(abar, jnp.float32), x_t) if jnp.ndim(abar) else abar
    a, s = jnp.sqrt(abar), jnp.sqrt(1 - abar)
    if self.prediction == "epsilon":
      return (x_t - s * model_output) / a, model_output
    if self.prediction == "x0":
      return model_output, (x_t - a * model_output) / s
    return a * x_t - s * model_output, a * model_output + s * x_t

  def loss(self, model_fn, x0, rng):
    """L_simple: mean squared error to the target, per example (B,)."""
    t_rng, n_rng = jax.random.split(rng)
    t = self.sample_time(t_rng, x0.shape[0])
    noise = jax.random.normal(n_rng, x0.shape, x0.dtype)
    output = model_fn(self.add_noise(x0, noise, t), self.model_time(t))
    output = output[..., :x0.shape[-1]]  # drop a learned-variance head if present
    per_example = mean_flat((output - self.target(x0, noise, t)) ** 2)
    return per_example, {"loss": per_example.mean()}
