"""Rectified flow (Liu et al. 2022; Esser et al. 2024, "SD3").

Straight path x_t = (1 - t)·x0 + t·ε, t ∈ [0, 1] (t = 1 is pure noise, the
diffusers / SD3 convention σ = t); the denoiser predicts the velocity
v = dx_t/dt = ε - x0. Training-time densities (SD3 §3.1):
  uniform        t ~ U(0, 1)
  logit_normal   t = sigmoid(m + s·n), n ~ N(0, 1)                       (eq. 19)
  mode           t = 1 - u - s·(cos²(π/2·u) - 1 + u), u ~ U(0, 1)     (eq. 20, "mode
                 sampling with heavy tails"; s ∈ [-1, 2/(π-2)] keeps it monotone)
  cosmap         t = 1 - 1/(tan(π/2·u) + 1), u ~ U(0, 1)                 (eq. 21)
then shifted for resolution, in training and in sampling alike (SD3 §5.3.2, eq. 23):
t' = α·t / (1 + (α - 1)·t), α = sqrt(m/n) for m pixels against a base resolution of n
(`resolution_shift`), or a fixed α (`shift`), or one per resolution from a table.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from ldm_jax.diffusion.process import mean_flat, training_draws
from ldm_jax.errors import check

TIME_SAMPLINGS = ("uniform", "logit_normal", "mode", "cosmap")
MODE_SCALE_RANGE = (-1.0, 2.0 / (math.pi - 2.0))


def shift_time(t, shift: float):
  """Resolution-dependent shift of times / sigmas (SD3 eq. 23)."""
  return shift * t / (1 + (shift - 1) * t)


def resolution_shift(config, image_size: int | None) -> float:
  """The shift α for `image_size` from `config.diffusion`: an entry of
  `shift_by_resolution` ((resolution, α), …) if one matches; else, with
  `shift_base_resolution` = n > 0, α = sqrt(image_size² / n²) (SD3: α = sqrt(m/n) for
  pixel counts m, n); else the fixed `shift`. Resolutions are the side length the
  process sees (latent or pixel: only the ratio matters)."""
  table = {int(r): float(a) for r, a in (config.get("shift_by_resolution") or ())}
  base = int(config.get("shift_base_resolution", 0) or 0)
  if table or base:
    check(image_size is not None and image_size > 0,
          "diffusion.shift_by_resolution / shift_base_resolution need the image size")
  if image_size in table:
    return table[image_size]
  if base:
    return math.sqrt(image_size * image_size / (base * base))
  check(not table, f"image size {image_size} has no entry in diffusion.shift_by_resolution "
        f"{sorted(table)}; add one or set diffusion.shift_base_resolution")
  return float(config.get("shift", 1.0))


PREDICTIONS = ("velocity", "x0")


@dataclasses.dataclass(frozen=True, eq=False)
class RectifiedFlow:
  """Rectified flow, trained on the velocity v = ε - x0 (conditional flow matching).

  `prediction` is what the network outputs: "velocity" (SD3; what diffusers' SD3
  pipeline expects) or "x0", the clean image, turned into the velocity
  v = (x_t - x̂0) / max(t, min_time) for the loss and the samplers (Li & He 2025, "Back
  to Basics: Let Denoising Generative Models Denoise": with large pixel patches a
  network predicts the clean image far better than the noise or the velocity, whose
  noise part it must copy from its input through every layer).
  """
  time_sampling: str = "logit_normal"
  logit_mean: float = 0.0
  logit_std: float = 1.0
  mode_scale: float = 1.29
  shift: float = 1.0
  num_train_timesteps: int = 1000  # model time = t * this, as SD3 / diffusers
  prediction: str = "velocity"
  min_time: float = 0.05           # x0 prediction: the velocity's divisor is max(t, this)

  def __post_init__(self):
    check(self.time_sampling in TIME_SAMPLINGS,
          f"unknown diffusion.time_sampling {self.time_sampling!r}; valid: {list(TIME_SAMPLINGS)}")
    check(self.shift > 0, f"diffusion.shift must be > 0, got {self.shift}")
    check(self.logit_std > 0, f"diffusion.logit_std must be > 0, got {self.logit_std}")
    check(self.prediction in PREDICTIONS, f"diffusion.prediction={self.prediction!r} for "
          f"rectified flow; valid: {list(PREDICTIONS)} ('' = velocity)")
    check(0 < self.min_time < 1, f"diffusion.min_time must be in (0, 1), got {self.min_time}")
    lo, hi = MODE_SCALE_RANGE
    check(lo <= self.mode_scale <= hi,
          f"diffusion.mode_scale={self.mode_scale} must be in [{lo}, {hi:.4f}] "
          f"(outside it the mode-sampling map is not monotone)")

  @classmethod
  def from_config(cls, config, image_size: int | None = None):
    """From `config.diffusion`; `image_size` resolves a resolution-dependent shift."""
    prediction = config.get("prediction", "") or "velocity"
    check(prediction in PREDICTIONS,
          f"diffusion.prediction={prediction!r} does not apply to rectified flow; valid: "
          f"{list(PREDICTIONS)} or '' (velocity); epsilon | v are for diffusion.process="
          "'gaussian'")
    for key, default in (("variance_type", "fixed_small"), ("loss_weighting", "simple"),
                         ("rescale_zero_snr", False)):
      value = config.get(key, default)
      check(value in (default, ""), f"diffusion.{key}={value!r} is for the gaussian process; "
            f"rectified flow trains the velocity with a plain MSE (leave it at {default!r})")
    return cls(time_sampling=config.get("time_sampling", "logit_normal"),
               logit_mean=config.get("logit_mean", 0.0), logit_std=config.get("logit_std", 1.0),
               mode_scale=config.get("mode_scale", 1.29),
               shift=resolution_shift(config, image_size),
               num_train_timesteps=config.get("num_timesteps", 1000),
               prediction=prediction, min_time=float(config.get("min_time", 0.05)))

  # -- the process interface -------------------------------------------------
  def sample_time(self, rng, batch: int) -> jax.Array:
    if self.time_sampling == "logit_normal":
      t = jax.nn.sigmoid(self.logit_mean + self.logit_std * jax.random.normal(rng, (batch,)))
    else:
      u = jax.random.uniform(rng, (batch,))
      t = self.time_from_uniform(u)
    return shift_time(t, self.shift)

  def time_from_uniform(self, u):
    """The (unshifted) time for u ~ U(0, 1) under the uniform, mode or cosmap density."""
    if self.time_sampling == "mode":
      return 1.0 - u - self.mode_scale * (jnp.cos(jnp.pi / 2 * u) ** 2 - 1.0 + u)
    if self.time_sampling == "cosmap":
      return 1.0 - 1.0 / (jnp.tan(jnp.pi / 2 * u) + 1.0)
    return u

  def model_time(self, t: jax.Array) -> jax.Array:
    return t * self.num_train_timesteps

  def add_noise(self, x0, noise, t):
    t = t.reshape(t.shape + (1,) * (x0.ndim - 1))
    return (1 - t) * x0 + t * noise

  def target(self, x0, noise, t):
    del t
    return noise - x0

  def velocity(self, output, x_t, t):
    """The velocity a network output means at x_t, time t (B,): the output itself, or
    for x0 prediction (x_t - output) / max(t, min_time)."""
    if self.prediction == "velocity":
      return output
    t = jnp.maximum(t, self.min_time).reshape(t.shape + (1,) * (x_t.ndim - 1))
    return (x_t - output[..., :x_t.shape[-1]]) / t

  def wrap_model(self, model_fn):
    """`model_fn(x_t, model_time, *args)` -> the same with the velocity as output (what
    the samplers integrate); unchanged for velocity prediction."""
    if self.prediction == "velocity":
      return model_fn

    def velocity_fn(x_t, model_time, *args, **kwargs):
      t = model_time / self.num_train_timesteps
      return self.velocity(model_fn(x_t, model_time, *args, **kwargs), x_t, t)
    return velocity_fn

  def predict_x0_eps(self, velocity, x_t, t):
    """(x0, ε) implied by a velocity prediction at x_t, time t (B,)."""
    t = t.reshape(t.shape + (1,) * (x_t.ndim - 1))
    return x_t - t * velocity, x_t + (1 - t) * velocity

  def loss(self, model_fn, x0, rng, draws=None):
    """Conditional flow matching: ||v_θ(x_t, t) - (ε - x0)||², per example (B,)."""
    t, noise = training_draws(self, rng, x0) if draws is None else draws
    x_t = self.add_noise(x0, noise, t)
    output = self.velocity(model_fn(x_t, self.model_time(t)), x_t, t)
    per_example = mean_flat((output[..., :x0.shape[-1]] - self.target(x0, noise, t)) ** 2)
    return per_example, {"loss": per_example.mean()}
