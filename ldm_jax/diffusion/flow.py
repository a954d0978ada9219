"""Rectified flow (Liu et al. 2022; Esser et al. 2024, "SD3").

Straight path x_t = (1 - t)·x0 + t·ε, t ∈ [0, 1] (t = 1 is pure noise, the
diffusers / SD3 convention σ = t); the denoiser predicts the velocity
v = dx_t/dt = ε - x0. Training times: uniform, or logit-normal (SD3 §3.1,
t = sigmoid(m + s·u), u ~ N(0, 1)), optionally shifted for resolution
(SD3 §5.3.2: t' = shift·t / (1 + (shift - 1)·t)).
"""

import dataclasses

import jax
import jax.numpy as jnp

from ldm_jax.diffusion.process import mean_flat
from ldm_jax.errors import check

TIME_SAMPLINGS = ("uniform", "logit_normal")


def shift_time(t, shift: float):
  """Resolution-dependent shift of times / sigmas (SD3 eq. 23)."""
  return shift * t / (1 + (shift - 1) * t)


@dataclasses.dataclass(frozen=True, eq=False)
class RectifiedFlow:
  """Rectified flow with velocity prediction."""
  time_sampling: str = "logit_normal"
  logit_mean: float = 0.0
  logit_std: float = 1.0
  shift: float = 1.0
  num_train_timesteps: int = 1000  # model time = t * this, as SD3 / diffusers

  def __post_init__(self):
    check(self.time_sampling in TIME_SAMPLINGS,
          f"unknown diffusion.time_sampling {self.time_sampling!r}; valid: {list(TIME_SAMPLINGS)}")
    check(self.shift > 0, f"diffusion.shift must be > 0, got {self.shift}")

  @classmethod
  def from_config(cls, config):
    return cls(time_sampling=config.get("time_sampling", "logit_normal"),
               logit_mean=config.get("logit_mean", 0.0), logit_std=config.get("logit_std", 1.0),
               shift=config.get("shift", 1.0),
               num_train_timesteps=config.get("num_timesteps", 1000))

  # -- the process interface -------------------------------------------------
  def sample_time(self, rng, batch: int) -> jax.Array:
    if self.time_sampling == "uniform":
      t = jax.random.uniform(rng, (batch,))
    else:
      t = jax.nn.sigmoid(self.logit_mean + self.logit_std * jax.random.normal(rng, (batch,)))
    return shift_time(t, self.shift)

  def model_time(self, t: jax.Array) -> jax.Array:
    return t * self.num_train_timesteps

  def add_noise(self, x0, noise, t):
    t = t.reshape(t.shape + (1,) * (x0.ndim - 1))
    return (1 - t) * x0 + t * noise

  def target(self, x0, noise, t):
    del t
    return noise - x0

  def predict_x0_eps(self, velocity, x_t, t):
    """(x0, ε) implied by a velocity prediction at x_t, time t (B,)."""
    t = t.reshape(t.shape + (1,) * (x_t.ndim - 1))
    return x_t - t * velocity, x_t + (1 - t) * velocity

  def loss(self, model_fn, x0, rng):
    """Conditional flow matching: ||v_θ(x_t, t) - (ε - x0)||², per example (B,)."""
    t_rng, n_rng = jax.random.split(rng)
    t = self.sample_time(t_rng, x0.shape[0])
    noise = jax.random.normal(n_rng, x0.shape, x0.dtype)
    output = model_fn(self.add_noise(x0, noise, t), self.model_time(t))
    per_example = mean_flat((output[..., :x0.shape[-1]] - self.target(x0, noise, t)) ** 2)
    return per_example, {"loss": per_example.mean()}
