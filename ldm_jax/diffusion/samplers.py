"""Samplers: each one `jax.lax.scan` over a precomputed schedule, deterministic given
a key. Schedules follow diffusers' schedulers exactly (so trajectories match
`DDPMScheduler`, `DDIMScheduler`, `FlowMatchEulerDiscreteScheduler`), plus
guided-diffusion's respacing ("250", "ddim25", "10,10,5").

`model_fn(x, model_time) -> output` (guidance already folded in; see guidance.py).
"""

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.flow import RectifiedFlow, shift_time
from ldm_jax.diffusion.gaussian import GaussianDiffusion
from ldm_jax.errors import UserError, check

SPACINGS = ("leading", "trailing", "linspace", "respace")
SAMPLERS = {"gaussian": ("ddpm", "ddim"), "flow": ("euler",)}


# -- schedules ---------------------------------------------------------------
def respaced_timesteps(num_timesteps: int, section_counts: str) -> np.ndarray:
  """guided-diffusion's `space_timesteps`: "ddimN" strides evenly; "a,b,c" takes a,
  b, c evenly spaced steps from equal thirds (ascending, unique)."""
  if section_counts.startswith("ddim"):
    desired = int(section_counts[len("ddim"):])
    for stride in range(1, num_timesteps):
      if len(range(0, num_timesteps, stride)) == desired:
        return np.arange(0, num_timesteps, stride)
    raise ValueError(f"cannot take exactly {desired} strided steps from {num_timesteps}")
  counts = [int(c) for c in section_counts.split(",")]
  size_per, extra = divmod(num_timesteps, len(counts))
  start, steps = 0, []
  for i, count in enumerate(counts):
    size = size_per + (1 if i < extra else 0)
    check(size >= count, f"cannot take {count} steps from a section of {size}")
    stride = (size - 1) / (count - 1) if count > 1 else 1
    index = 0.0  # accumulated, not stride * k: .5 ties then round as in guided-diffusion
    for _ in range(count):
      steps.append(start + round(index))
      index += stride
    start += size
  return np.array(sorted(set(steps)))


def gaussian_timesteps(num_timesteps: int, num_steps, spacing: str = "leading",
                       steps_offset: int = 0, prev_rule: str = "list"):
  """Descending sampling timesteps and the timestep each step moves to.

  Args:
    num_steps: int, or for spacing "respace" a string ("250", "ddim25", "10,10,5").
    spacing: diffusers' "leading" / "trailing" / "linspace", or "respace".
    prev_rule: "list" (the next timestep in the list; DDPM and guided-diffusion) or
      "stride" (t - T // n, as diffusers' DDIMScheduler).
  Returns:
    (timesteps, prev_timesteps) int32 arrays; prev < 0 means "the clean image".
  """
  check(spacing in SPACINGS, f"unknown timestep spacing {spacing!r}; valid: {list(SPACINGS)}")
  if spacing == "respace":
    timesteps = respaced_timesteps(num_timesteps, str(num_steps))[::-1]
    n = len(timesteps)
  else:
    n = int(num_steps)
    check(1 <= n <= num_timesteps,
          f"sample.num_steps={n} must be in [1, {num_timesteps}] (the training timesteps)")
    if spacing == "linspace":
      timesteps = np.linspace(0, num_timesteps - 1, n).round()[::-1].astype(np.int64)
    elif spacing == "leading":
      timesteps = (np.arange(0, n) * (num_timesteps // n)).round()[::-1].astype(np.int64)
      timesteps = timesteps + steps_offset
    else:
      timesteps = np.round(np.arange(num_timesteps, 0, -num_timesteps / n)).astype(np.int64) - 1
  if prev_rule == "stride":
    prev = timesteps - num_timesteps // n
  else:
    prev = np.append(timesteps[1:], -1)
  return timesteps.astype(np.int32), prev.astype(np.int32)


def flow_sigmas(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000):
  """σ schedule of diffusers' FlowMatchEulerDiscreteScheduler (static shift), with
  the terminal 0 appended: (num_steps + 1,) float32. As diffusers, the training-grid
  minimum σ (already shifted) is linearly spaced to and then shifted once more.
  As there, the training grid is float32 and the inference grid float64 until the end."""
  check(num_steps >= 1, f"sample.num_steps must be >= 1, got {num_steps}")
  sigma_max = float(shift_time(np.float32(1.0), shift))
  sigma_min = float(shift_time(np.float32(1.0) / np.float32(num_train_timesteps), shift))
  t = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_steps,
                  dtype=np.float64)
  sigmas = shift_time(t / num_train_timesteps, shift).astype(np.float32)
  return np.append(sigmas, np.float32(0.0)).astype(np.float32)


# -- samplers ----------------------------------------------------------------
def ddpm_sample(model_fn, process: GaussianDiffusion, x_init, key, timesteps, prev_timesteps,
                variance: str = "fixed_small", clip_x0: float | None = None):
  """Ancestral sampling (DDPM eq. 6-7 with a possibly respaced chain).

  Noise at step i is `normal(fold_in(key, i))`; no noise is added when t == 0.
  """
  check(variance in ("fixed_small", "fixed_large"),
        f"unknown DDPM variance {variance!r}; valid: ['fixed_small', 'fixed_large']")

  def step(x, inputs):
    i, t, t_prev = inputs
    abar_t, abar_prev = process.alpha_bar(t), process.alpha_bar(t_prev)
    alpha_t = abar_t / abar_prev
    beta_t = 1 - alpha_t
    output = model_fn(x, jnp.full((x.shape[0],), t, jnp.float32))[..., :x.shape[-1]]
    x0, _ = process.predict_x0_eps(output, x, alpha_bar=abar_t)
    if clip_x0 is not None:
      x0 = jnp.clip(x0, -clip_x0, clip_x0)
    mean = (jnp.sqrt(abar_prev) * beta_t / (1 - abar_t)) * x0 + (
        jnp.sqrt(alpha_t) * (1 - abar_prev) / (1 - abar_t)) * x
    if variance == "fixed_small":
      var = jnp.maximum((1 - abar_prev) / (1 - abar_t) * beta_t, 1e-20)
    else:
      var = beta_t
    noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
    return mean + jnp.where(t > 0, jnp.sqrt(var), 0.0) * noise, None

  steps = (jnp.arange(len(timesteps)), jnp.asarray(timesteps), jnp.asarray(prev_timesteps))
  return jax.lax.scan(step, x_init, steps)[0]


def ddim_sample(model_fn, process: GaussianDiffusion, x_init, key, timesteps, prev_timesteps,
                eta: float = 0.0, final_alpha_bar: float = 1.0, clip_x0: float | None = None):
  """DDIM (Song et al. 2021, eq. 12); η = 0 is deterministic, η = 1 is DDPM-like.

  `final_alpha_bar` is ᾱ used when prev < 0 (1.0 = diffusers' set_alpha_to_one).
  `timesteps` and `prev_timesteps` must be concrete (numpy) arrays: the per-step σ and
  direction coefficients are computed on the host (see `_ddim_coefficients`).
  """
  abar_prev, std, direction = _ddim_coefficients(process.alphas_cumprod, timesteps,
                                                 prev_timesteps, eta, final_alpha_bar)

  def step(x, inputs):
    i, t, abar_prev, std, direction = inputs
    abar_t = process.alpha_bar(t)
    output = model_fn(x, jnp.full((x.shape[0],), t, jnp.float32))[..., :x.shape[-1]]
    x0, eps = process.predict_x0_eps(output, x, alpha_bar=abar_t)
    if clip_x0 is not None:
      x0 = jnp.clip(x0, -clip_x0, clip_x0)
    x = jnp.sqrt(abar_prev) * x0 + direction * eps
    if eta > 0:
      x = x + std * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
    return x, None

  steps = (jnp.arange(len(timesteps)), jnp.asarray(timesteps), jnp.asarray(abar_prev),
           jnp.asarray(std), jnp.asarray(direction))
  return jax.lax.scan(step, x_init, steps)[0]


def _ddim_coefficients(alphas_cumprod, timesteps, prev_timesteps, eta, final_alpha_bar):
  """Per-step ᾱ_prev, σ = η·sqrt((1-ᾱ_prev)/(1-ᾱ_t)·(1-ᾱ_t/ᾱ_prev)) and the direction
  coefficient sqrt(1 - ᾱ_prev - σ²), in float32 numpy with diffusers' operation order.

  On the host because 1 - ᾱ_prev - σ² cancels catastrophically when η ≈ 1 and
  ᾱ_t ≪ ᾱ_prev (the first steps from t ≈ T): its value then hangs on the rounding of
  every operation, and compiled by XLA (which folds sqrt(v)² back to v and fuses the
  square into the subtraction) it differed from diffusers' by percents.
  """
  one = np.float32(1.0)
  timesteps, prev_timesteps = np.asarray(timesteps), np.asarray(prev_timesteps)
  abar_t = alphas_cumprod[timesteps]
  abar_prev = np.where(prev_timesteps >= 0, alphas_cumprod[np.maximum(prev_timesteps, 0)],
                       np.float32(final_alpha_bar)).astype(np.float32)
  variance = ((one - abar_prev) / (one - abar_t)) * (one - abar_t / abar_prev)
  std = (np.float32(eta) * np.sqrt(variance)).astype(np.float32)
  direction = np.sqrt(one - abar_prev - std * std).astype(np.float32)
  return abar_prev, std, direction


def flow_euler_sample(model_fn, process: RectifiedFlow, x_init, sigmas):
  """Euler on the flow ODE dx/dσ = v from σ = sigmas[0] (noise) to sigmas[-1] = 0."""

  def step(x, inputs):
    sigma, sigma_next = inputs
    velocity = model_fn(x, jnp.full((x.shape[0],), sigma * process.num_train_timesteps,
                                    jnp.float32))[..., :x.shape[-1]]
    return x + (sigma_next - sigma) * velocity, None

  sigmas = jnp.asarray(sigmas)
  return jax.lax.scan(step, x_init, (sigmas[:-1], sigmas[1:]))[0]


def _gaussian_steps(sample_config):
  """(num_steps, spacing): `sample.respacing` ("250", "ddim25", "10,10,5"), when set,
  selects guided-diffusion respacing; otherwise `num_steps` with `timestep_spacing`."""
  respacing = sample_config.get("respacing", "")
  if respacing:
    return str(respacing), "respace"
  return sample_config.num_steps, sample_config.get("timestep_spacing", "leading")


def check_sample_config(process, sample_config) -> str:
  """Validates `config.sample` against the process (before any training starts);
  returns the process kind, "flow" or "gaussian"."""
  kind = "flow" if isinstance(process, RectifiedFlow) else "gaussian"
  name = sample_config.sampler
  check(name in SAMPLERS[kind],
        f"sample.sampler={name!r} does not apply to a {kind} process; valid: {list(SAMPLERS[kind])}")
  check(sample_config.get("guidance_scale", 1.0) >= 0,
        f"sample.guidance_scale must be >= 0, got {sample_config.get('guidance_scale')}")
  if kind == "flow":
    check(int(sample_config.num_steps) >= 1,
          f"sample.num_steps must be >= 1, got {sample_config.num_steps}")
    return kind
  steps, spacing = _gaussian_steps(sample_config)
  check(spacing in SPACINGS, f"unknown sample.timestep_spacing {spacing!r}; valid: {list(SPACINGS)}")
  if spacing == "respace":
    try:
      respaced_timesteps(process.num_timesteps, str(steps))
    except ValueError as e:
      raise UserError(f"bad sample.respacing {steps!r} for {process.num_timesteps} timesteps "
                      f"(valid: 'N', 'ddimN' or comma-separated counts such as '10,10,5'): "
                      f"{e}") from e
  else:
    check(1 <= int(steps) <= process.num_timesteps,
          f"sample.num_steps={steps} must be in [1, {process.num_timesteps}] "
          f"(the training timesteps)")
  return kind


def run_sampler(process, model_fn, shape, key, sample_config):
  """Draws x_T ~ N(0, I) of `shape` and runs the sampler named in `config.sample`."""
  kind = check_sample_config(process, sample_config)
  init_key, noise_key = jax.random.split(key)
  x_init = jax.random.normal(init_key, shape, jnp.float32)
  if kind == "flow":
    return flow_euler_sample(model_fn, process, x_init,
                             flow_sigmas(sample_config.num_steps, process.shift,
                                         process.num_train_timesteps))
  clip = sample_config.get("clip_x0") or None  # 0 = no clipping
  steps, spacing = _gaussian_steps(sample_config)
  offset = sample_config.get("steps_offset", 0)
  if sample_config.sampler == "ddpm":
    ts, prev = gaussian_timesteps(process.num_timesteps, steps, spacing, offset, prev_rule="list")
    return ddpm_sample(model_fn, process, x_init, noise_key, ts, prev,
                       sample_config.get("variance", "fixed_small"), clip)
  ts, prev = gaussian_timesteps(process.num_timesteps, steps, spacing, offset,
                                prev_rule="list" if spacing == "respace" else "stride")
  return ddim_sample(model_fn, process, x_init, noise_key, ts, prev,
                     sample_config.get("eta", 0.0), sample_config.get("final_alpha_bar", 1.0),
                     clip)
