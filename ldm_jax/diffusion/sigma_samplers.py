"""σ-parametrised samplers for discrete Gaussian diffusion: Euler, Heun (Karras et al.
2022, "EDM", Alg. 1-2) and DPM-Solver / DPM-Solver++ multistep (Lu et al. 2022), with
the schedules and update rules of diffusers' `EulerDiscreteScheduler`,
`HeunDiscreteScheduler` and `DPMSolverMultistepScheduler`.

σ_t = sqrt((1 - ᾱ_t) / ᾱ_t) is the noise level of the "variance exploding" view of the
process: x_σ = x_t / sqrt(ᾱ_t) = x0 + σ·ε. Euler and Heun integrate the probability-flow
ODE dx/dσ = (x - x̂0) / σ in that view, feeding the model x_σ / sqrt(σ² + 1) = x_t (what
diffusers' `scale_model_input` does); DPM-Solver works on x_t itself, with
α = 1 / sqrt(σ² + 1), σ_t = σ·α and λ = log α - log σ_t.

Each builder computes its whole schedule on the host in numpy, in diffusers' dtypes and
operation order (timesteps and σ grids are bit-identical to diffusers'; per-step scalar
coefficients are rounded to float32 on the host as torch computes them on 0-d float32
tensors), and returns a jittable

    sample(model_fn, noise, key, cond_fn=None) -> x0

`model_fn(x, model_time)`: x is the model input (after `scale_model_input`), model_time
the (B,) float32 timestep diffusers passes to the UNet; output channels beyond
x.shape[-1] (a learned variance) are dropped. `noise` is a standard normal x_T draw; the
sampler multiplies it by diffusers' `init_noise_sigma`. Stochastic steps draw step i's
noise as `normal(fold_in(key, i))`.

`cond_fn(x, model_time) -> g` (optional classifier guidance, Dhariwal & Nichol 2021):
g = s·∇ log p(y | x_t) taken at the model input x = x_t (the scaled sample for
Euler/Heun, the sample itself for DPM-Solver), at the same model time. The model output
is turned into ε at that x_t with α = 1/sqrt(σ²+1), corrected ε̂ = ε - sqrt(1-α²)·g, and
converted back to the model's parametrisation before the step.

DPM-Solver also runs on a `RectifiedFlow` process: diffusers' flow-matching mode
(use_flow_sigmas, prediction_type="flow_prediction"), α = 1 - σ, σ_t = σ, x0 = x - σ·v.

Options are diffusers' config keys for the scheduler (plus Euler's `step` arguments
s_churn, s_tmin, s_tmax, s_noise), with diffusers' defaults; process-level keys (betas,
prediction type, zero-SNR rescaling) come from the process.

Numerics: the update formulas are diffusers' expressions in diffusers' order, and a
division by a per-step scalar is kept a true division (`_div`), so run op by op
(`jax.disable_jit`) Euler and Heun trajectories are bit-identical to diffusers'. Compiled,
XLA fuses a·b + c into one fused multiply-add; where σ_max ≫ σ_1 (the cosine schedule's
σ_max ≈ 2e4, zero-SNR's 4096) the first step cancels and amplifies that last-ulp
difference ~σ_max/σ_1-fold, as it amplifies diffusers' own float32 rounding (its float32
result is then 1e-5 to 1e-3 away from the same computation in float64).

Kept diffusers behaviours worth knowing:
  * Euler "log_linear" interpolation makes n + 1 σ, so the last step ends at the smallest
    training σ instead of the final σ (with continuous v timesteps it runs n + 1 steps).
  * Euler with s_churn: the model sees the sample before the churn noise, and
    v-prediction converts with σ, not σ̂.
  * DPM-Solver with Karras / Lu σ truncates (not rounds) the timesteps of the cosine
    schedule; when that repeats the first timestep, diffusers' own loop starts at step 1
    and fails at its end (IndexError), while this sampler runs every step.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion import schedules
from ldm_jax.diffusion.flow import RectifiedFlow
from ldm_jax.diffusion.samplers import threshold_x0
from ldm_jax.errors import check

SPACINGS = ("linspace", "leading", "trailing")

EULER_OPTIONS = dict(
    interpolation_type="linear", use_karras_sigmas=False, use_exponential_sigmas=False,
    use_beta_sigmas=False, sigma_min=None, sigma_max=None, timestep_spacing="linspace",
    timestep_type="discrete", steps_offset=0, final_sigmas_type="zero",
    # arguments of EulerDiscreteScheduler.step
    s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0)

HEUN_OPTIONS = dict(
    use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
    clip_sample=False, clip_sample_range=1.0, timestep_spacing="linspace", steps_offset=0)

DPM_OPTIONS = dict(
    solver_order=2, thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
    algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
    euler_at_final=False, use_karras_sigmas=False, use_exponential_sigmas=False,
    use_beta_sigmas=False, use_lu_lambdas=False, use_flow_sigmas=False, flow_shift=1.0,
    final_sigmas_type="zero", lambda_min_clipped=-float("inf"), variance_type=None,
    timestep_spacing="linspace", steps_offset=0, use_dynamic_shifting=False,
    time_shift_type="exponential",
    # argument of DPMSolverMultistepScheduler.set_timesteps (flow sigmas, dynamic shifting)
    mu=None)

DPM_ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")


# -- options -----------------------------------------------------------------
def _options(name, defaults, options):
  """defaults updated by options; unknown keys are a UserError naming the valid ones."""
  unknown = sorted(set(options) - set(defaults))
  check(not unknown, f"unknown {name} option(s) {unknown}; valid: {sorted(defaults)}")
  merged = dict(defaults)
  merged.update(options)
  return merged


def _check_one_of(name, key, value, valid):
  check(value in valid, f"{name}: unknown {key}={value!r}; valid: {list(valid)}")


def _check_common(name, opts, num_inference_steps):
  check(isinstance(num_inference_steps, (int, np.integer)) and num_inference_steps >= 1,
        f"{name}: num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
  _check_one_of(name, "timestep_spacing", opts["timestep_spacing"], SPACINGS)
  flags = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
           if opts[k]]
  check(len(flags) <= 1, f"{name}: only one of use_karras_sigmas, use_exponential_sigmas, "
        f"use_beta_sigmas can be set; got {flags}")


# -- schedules (host, numpy, diffusers' dtypes) -------------------------------
def _alphas_cumprod(process):
  """ᾱ (float32); with a zero-terminal-SNR process ᾱ_T = 0 is replaced by 2**-24, as
  diffusers' Euler and DPM-Solver do when `rescale_betas_zero_snr` (so σ_max is finite)."""
  abar = np.array(process.alphas_cumprod, dtype=np.float32, copy=True)
  if getattr(process, "zero_terminal_snr", False):
    abar[-1] = np.float32(2.0 ** -24)
  check(bool(np.all(abar > 0)), "the σ samplers need ᾱ_t > 0 at every training timestep "
        "(build the process with zero_terminal_snr=True for a rescaled schedule)")
  return abar


def _train_sigmas(abar):
  """σ_t = ((1 - ᾱ) / ᾱ) ** 0.5 in float32 (ascending in t)."""
  one = np.float32(1.0)
  return np.sqrt((one - abar) / abar).astype(np.float32)


def _spaced_timesteps(spacing, num_train, n, steps_offset):
  """Euler/Heun timesteps (float32, descending) for the three spacings."""
  if spacing == "linspace":
    return np.linspace(0, num_train - 1, n, dtype=np.float32)[::-1].copy()
  if spacing == "leading":
    ratio = num_train // n
    ts = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.float32)
    return ts + np.float32(steps_offset)
  ratio = num_train / n
  return np.arange(num_train, 0, -ratio).round().copy().astype(np.float32) - np.float32(1)


def _sigma_to_t(sigmas, log_sigmas):
  """Fractional training timestep of each σ: linear interpolation of log σ between the
  two neighbouring training log σ (float32 table; result float64, clipped to the grid)."""
  sigmas = np.asarray(sigmas, dtype=np.float64)
  log_sigma = np.log(np.maximum(sigmas, 1e-10))
  above = (log_sigma[None, :] - log_sigmas[:, None]) >= 0
  low = np.cumsum(above, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
  high = low + 1
  lo_v, hi_v = log_sigmas[low], log_sigmas[high]
  w = np.clip((lo_v - log_sigma) / (lo_v - hi_v), 0, 1)
  return (1 - w) * low + w * high


def _range(in_sigmas, sigma_min, sigma_max):
  lo = float(in_sigmas[-1]) if sigma_min is None else sigma_min
  hi = float(in_sigmas[0]) if sigma_max is None else sigma_max
  return lo, hi


def _karras(in_sigmas, n, sigma_min=None, sigma_max=None, rho=7.0):
  """Karras et al. (2022) eq. 5: σ_i = (σ_max^(1/ρ) + i/(n-1)·(σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ."""
  lo, hi = _range(in_sigmas, sigma_min, sigma_max)
  ramp = np.linspace(0, 1, n)
  lo_r, hi_r = lo ** (1 / rho), hi ** (1 / rho)
  return (hi_r + ramp * (lo_r - hi_r)) ** rho


def _exponential(in_sigmas, n, sigma_min=None, sigma_max=None):
  """σ evenly spaced in log σ from σ_max to σ_min."""
  lo, hi = _range(in_sigmas, sigma_min, sigma_max)
  return np.exp(np.linspace(math.log(hi), math.log(lo), n))


def _beta(in_sigmas, n, sigma_min=None, sigma_max=None, a=0.6, b=0.6):
  """Lee et al. 2024 ("Beta sampling is all you need"): σ = σ_min + F⁻¹(1 - i/(n-1))·
  (σ_max - σ_min), F the Beta(0.6, 0.6) CDF."""
  import scipy.stats  # pylint: disable=import-outside-toplevel
  lo, hi = _range(in_sigmas, sigma_min, sigma_max)
  ppf = np.array([scipy.stats.beta.ppf(q, a, b) for q in 1 - np.linspace(0, 1, n)])
  return np.array([lo + p * (hi - lo) for p in ppf])


def _lu(log_sigmas_desc, n):
  """Lu et al. (DPM-Solver++): log σ evenly spaced between its training extremes."""
  lo, hi = float(log_sigmas_desc[-1]), float(log_sigmas_desc[0])
  ramp = np.linspace(0, 1, n)
  return np.exp((hi + ramp * (lo - hi)) ** 1.0)


def _is_cosine(process):
  """Whether the process uses the cosine ("squaredcos_cap_v2") β schedule: diffusers'
  DPM-Solver rounds Karras / Lu timesteps except for that schedule (it truncates)."""
  name = getattr(process, "beta_schedule", None)
  if name is not None:
    return name == "cosine"
  cosine = schedules.make_betas("cosine", process.num_timesteps)
  if getattr(process, "zero_terminal_snr", False):
    cosine = schedules.rescale_zero_terminal_snr(cosine)
  return bool(np.array_equal(np.asarray(process.betas), cosine))


def _init_noise_sigma(sigmas, spacing):
  """diffusers' Euler/Heun `init_noise_sigma`: σ_max, or sqrt(σ_max² + 1) for "leading"."""
  top = np.float32(np.max(sigmas))
  if spacing in ("linspace", "trailing"):
    return top
  return np.float32(np.sqrt(top * top + np.float32(1.0)))


def _respace_sigmas(opts, sigmas, timesteps, n, log_sigmas, **bounds):
  """Euler / Heun: the Karras, exponential or beta σ spacing the options ask for (at
  most one), with the timesteps mapped back from the new σ; unchanged otherwise."""
  convert = {"use_karras_sigmas": _karras, "use_exponential_sigmas": _exponential,
             "use_beta_sigmas": _beta}
  for flag, fn in convert.items():
    if opts[flag]:
      sigmas = fn(sigmas, n, **bounds)
      timesteps = _sigma_to_t(sigmas, log_sigmas)
  return sigmas, timesteps


def euler_schedule(process, num_inference_steps, **options):
  """(timesteps (N,) float32, sigmas (N + 1,) float32, init_noise_sigma, options) of
  diffusers' `EulerDiscreteScheduler.set_timesteps` with these options.

  As in diffusers, "log_linear" interpolation makes n + 1 σ (so the last step ends at the
  smallest training σ, not at the final σ) and, with continuous v-prediction
  timesteps, n + 1 steps; step i always goes from sigmas[i] to sigmas[i + 1].
  """
  name = "euler_sampler"
  opts = _options(name, EULER_OPTIONS, options)
  _check_common(name, opts, num_inference_steps)
  _check_one_of(name, "interpolation_type", opts["interpolation_type"], ("linear", "log_linear"))
  _check_one_of(name, "timestep_type", opts["timestep_type"], ("discrete", "continuous"))
  _check_one_of(name, "final_sigmas_type", opts["final_sigmas_type"], ("zero", "sigma_min"))
  check(opts["s_churn"] >= 0 and opts["s_noise"] >= 0,
        f"{name}: s_churn and s_noise must be >= 0, got s_churn={opts['s_churn']!r}, "
        f"s_noise={opts['s_noise']!r}")
  n = int(num_inference_steps)
  abar = _alphas_cumprod(process)
  train_sigmas = _train_sigmas(abar)
  log_sigmas = np.log(train_sigmas)
  timesteps = _spaced_timesteps(opts["timestep_spacing"], process.num_timesteps, n,
                                opts["steps_offset"])
  if opts["interpolation_type"] == "linear":
    sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
  else:
    # torch.linspace(log σ_max, log σ_min, n + 1) in float32, then exp.
    sigmas = np.exp(schedules._torch_linspace_float32(  # pylint: disable=protected-access
        float(np.log(train_sigmas[-1])), float(np.log(train_sigmas[0])), n + 1))
  sigmas, timesteps = _respace_sigmas(opts, sigmas, timesteps, n, log_sigmas,
                                      sigma_min=opts["sigma_min"], sigma_max=opts["sigma_max"])
  if opts["final_sigmas_type"] == "sigma_min":
    last = train_sigmas[0]
  else:
    last = np.float32(0.0)
  sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
  if opts["timestep_type"] == "continuous" and process.prediction == "v":
    timesteps = np.float32(0.25) * np.log(sigmas[:-1])
  timesteps = np.asarray(timesteps).astype(np.float32)
  return timesteps, sigmas, _init_noise_sigma(sigmas, opts["timestep_spacing"]), opts


def heun_schedule(process, num_inference_steps, **options):
  """(timesteps (2N-1,), sigmas (2N,), init_noise_sigma, options) of diffusers'
  `HeunDiscreteScheduler.set_timesteps`: every timestep but the first and every σ but the
  first and last (0) repeated, one entry per model evaluation."""
  name = "heun_sampler"
  opts = _options(name, HEUN_OPTIONS, options)
  _check_common(name, opts, num_inference_steps)
  n = int(num_inference_steps)
  abar = _alphas_cumprod(process)
  train_sigmas = _train_sigmas(abar)
  log_sigmas = np.log(train_sigmas)
  timesteps = _spaced_timesteps(opts["timestep_spacing"], process.num_timesteps, n,
                                opts["steps_offset"])
  sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
  sigmas, timesteps = _respace_sigmas(opts, sigmas, timesteps, n, log_sigmas)
  sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
  sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
  timesteps = np.asarray(timesteps)
  timesteps = np.concatenate([timesteps[:1], np.repeat(timesteps[1:], 2)]).astype(np.float32)
  return timesteps, sigmas, _init_noise_sigma(sigmas, opts["timestep_spacing"]), opts


def _dpm_timesteps(opts, num_train, n, lambda_t):
  """DPM-Solver's spaced integer timesteps, stopping where λ_t < lambda_min_clipped."""
  clipped = int(np.searchsorted(lambda_t[::-1], np.float32(opts["lambda_min_clipped"]),
                                side="left"))
  last = num_train - clipped
  spacing = opts["timestep_spacing"]
  if spacing == "linspace":
    ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
  elif spacing == "leading":
    ratio = last // (n + 1)
    ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
    ts += opts["steps_offset"]
  else:
    ratio = num_train / n
    ts = np.arange(last, 0, -ratio).round().copy().astype(np.int64) - 1
  return ts


def dpm_solver_schedule(process, num_inference_steps, **options):
  """(timesteps (N,) int64, sigmas (N + 1,) float32, options) of diffusers'
  `DPMSolverMultistepScheduler.set_timesteps`; init_noise_sigma is 1."""
  name = "dpm_solver_sampler"
  opts = _options(name, DPM_OPTIONS, options)
  _check_common(name, opts, num_inference_steps)
  _check_one_of(name, "algorithm_type", opts["algorithm_type"], DPM_ALGORITHMS)
  _check_one_of(name, "solver_type", opts["solver_type"], ("midpoint", "heun"))
  _check_one_of(name, "solver_order", opts["solver_order"], (1, 2, 3))
  _check_one_of(name, "final_sigmas_type", opts["final_sigmas_type"], ("zero", "sigma_min"))
  _check_one_of(name, "variance_type", opts["variance_type"], (None, "learned", "learned_range"))
  if isinstance(process, RectifiedFlow):
    return _dpm_flow_schedule(name, process, num_inference_steps, opts)
  check(not opts["use_flow_sigmas"], f"{name}: use_flow_sigmas=True is for flow-matching "
        "models (prediction_type='flow_prediction'): build the sampler on a RectifiedFlow "
        "process; valid for a Gaussian process: [False]")
  # use_dynamic_shifting and flow_shift have no effect here (as in diffusers) but mu has.
  check(opts["mu"] is None, f"{name}: mu applies to flow sigmas only (a RectifiedFlow "
        "process, use_dynamic_shifting=True); valid for a Gaussian process: mu=None")
  check(opts["algorithm_type"] in ("dpmsolver++", "sde-dpmsolver++")
        or opts["final_sigmas_type"] != "zero",
        f"{name}: final_sigmas_type='zero' is not supported with algorithm_type="
        f"{opts['algorithm_type']!r} (as in diffusers); use final_sigmas_type='sigma_min' or "
        f"algorithm_type in ['dpmsolver++', 'sde-dpmsolver++']")
  check(not (opts["algorithm_type"] == "sde-dpmsolver" and opts["solver_order"] == 3),
        f"{name}: solver_order=3 is not defined for algorithm_type='sde-dpmsolver' (diffusers "
        "has no third-order update for it); valid solver_order: [1, 2]")
  n = int(num_inference_steps)
  abar = _alphas_cumprod(process)
  one = np.float32(1.0)
  with np.errstate(divide="ignore"):
    lambda_t = (np.log(np.sqrt(abar)) - np.log(np.sqrt(one - abar))).astype(np.float32)
  timesteps = _dpm_timesteps(opts, process.num_timesteps, n, lambda_t)
  train_sigmas = _train_sigmas(abar)
  log_sigmas = np.log(train_sigmas)
  rounded = not _is_cosine(process)
  if opts["use_karras_sigmas"]:
    sigmas = _karras(train_sigmas[::-1].copy(), n)
    timesteps = _sigma_to_t(sigmas, log_sigmas)
    timesteps = timesteps.round() if rounded else timesteps
  elif opts["use_lu_lambdas"]:
    sigmas = _lu(log_sigmas[::-1].copy(), n)
    timesteps = _sigma_to_t(sigmas, log_sigmas)
    timesteps = timesteps.round() if rounded else timesteps
  elif opts["use_exponential_sigmas"]:
    sigmas = _exponential(train_sigmas[::-1].copy(), n)
    timesteps = _sigma_to_t(sigmas, log_sigmas)
  elif opts["use_beta_sigmas"]:
    sigmas = _beta(train_sigmas[::-1].copy(), n)
    timesteps = _sigma_to_t(sigmas, log_sigmas)
  else:
    sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
  last = train_sigmas[0] if opts["final_sigmas_type"] == "sigma_min" else np.float32(0.0)
  sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
  timesteps = np.asarray(timesteps).astype(np.int64)  # float timesteps truncate, as in torch
  return timesteps, sigmas, opts


def _dpm_flow_schedule(name, process, num_inference_steps, opts):
  """`DPMSolverMultistepScheduler.set_timesteps` with use_flow_sigmas (flow-matching
  models such as SANA): n σ linear in 1 - σ from 1 - 1/T, shifted by flow_shift (or
  e^mu with dynamic shifting), timesteps σ·T truncated to integers, then the final σ."""
  check(opts["use_flow_sigmas"], f"{name}: a flow process needs use_flow_sigmas=True "
        "(DPMSolverMultistepScheduler's flow-matching mode)")
  flags = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                       "use_lu_lambdas") if opts[k]]
  check(not flags, f"{name}: {flags} cannot be combined with use_flow_sigmas=True (diffusers "
        "then takes the β schedule's σ with flow-matching α, σ); set them False")
  check(opts["final_sigmas_type"] == "zero",
        f"{name}: final_sigmas_type={opts['final_sigmas_type']!r} is not supported with "
        "use_flow_sigmas=True (it ends at the β schedule's smallest σ); valid: ['zero']")
  check(opts["algorithm_type"] in ("dpmsolver++", "sde-dpmsolver++"),
        f"{name}: algorithm_type={opts['algorithm_type']!r} is not defined for flow "
        "prediction (diffusers raises); valid: ['dpmsolver++', 'sde-dpmsolver++']")
  mu = opts["mu"]
  if mu is not None:
    check(opts["use_dynamic_shifting"] and opts["time_shift_type"] == "exponential",
          f"{name}: mu needs use_dynamic_shifting=True and time_shift_type='exponential'")
    shift = np.exp(mu)
  else:
    shift = opts["flow_shift"]
  check(shift > 0, f"{name}: flow_shift={shift!r} must be > 0")
  n, T = int(num_inference_steps), int(process.num_train_timesteps)
  sigmas = 1.0 - np.linspace(1, 1 / T, n + 1)
  sigmas = np.flip(shift * sigmas / (1 + (shift - 1) * sigmas))[:-1].copy()
  timesteps = (sigmas * T).astype(np.int64)  # torch's int64 cast truncates
  sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
  return timesteps, sigmas, opts


# -- shared step helpers ----------------------------------------------------------
def _f32(x):
  return np.asarray(x, dtype=np.float32)


def _model(model_fn, x, t):
  """model_fn at model time t (scalar) for the whole batch; extra channels dropped."""
  out = model_fn(x, jnp.full((x.shape[0],), t, jnp.float32))
  return out[..., :x.shape[-1]]


def _guided(prediction, output, x_t, t, alpha, sigma, cond_fn):
  """The model output with classifier guidance folded in: ε̂ = ε - σ_t·g at x_t, where
  alpha = sqrt(ᾱ), sigma = sqrt(1 - ᾱ) and g = cond_fn(x_t, t) (see module docstring)."""
  g = cond_fn(x_t, jnp.full((x_t.shape[0],), t, jnp.float32))
  if prediction == "epsilon":
    return output - sigma * g
  if prediction == "x0":
    eps = (x_t - alpha * output) / sigma
  else:
    eps = alpha * output + sigma * x_t
  eps = eps - sigma * g
  x0 = (x_t - sigma * eps) / alpha
  return x0 if prediction == "x0" else alpha * eps - sigma * x0


def _vp_alpha_sigma(sigmas):
  """α = 1 / sqrt(σ² + 1) and σ_t = σ·α (float32, as diffusers' `_sigma_to_alpha_sigma_t`)."""
  sigmas = _f32(sigmas)
  alpha = (np.float32(1.0) / np.sqrt(sigmas * sigmas + np.float32(1.0))).astype(np.float32)
  return alpha, (sigmas * alpha).astype(np.float32)


def _flow_alpha_sigma(sigmas):
  """α = 1 - σ and σ_t = σ (float32): diffusers' `_sigma_to_alpha_sigma_t` with flow
  sigmas."""
  sigmas = _f32(sigmas)
  return (np.float32(1.0) - sigmas).astype(np.float32), sigmas


def _div(a, b):
  """a / b for a per-step scalar b, rounded once, as torch divides. XLA's simplifier turns
  a division by a broadcast scalar into a multiplication by its reciprocal (two
  roundings), which the first steps from a large σ_max amplify; the barrier hides the
  broadcast from it."""
  return a / jax.lax.optimization_barrier(jnp.broadcast_to(b, a.shape))


def _step_noise(key, i, x):
  return jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)


# -- Euler -------------------------------------------------------------------------
def euler_sampler(process, num_inference_steps, **options):
  """diffusers' `EulerDiscreteScheduler` (+ its `step` arguments s_churn, s_tmin, s_tmax,
  s_noise) as a jittable `sample(model_fn, noise, key, cond_fn=None)`.

  With s_churn = 0 this is Euler's method on the probability-flow ODE (Karras et al.
  Alg. 1 without churn). With s_churn > 0, on steps with s_tmin <= σ <= s_tmax, noise is
  added to raise σ to σ̂ = σ·(1 + γ), γ = min(s_churn / (len(sigmas) - 1), √2 - 1).
  As in diffusers, the model is evaluated at the sample *before* that noise is added (at
  σ, not σ̂), and v-prediction converts with σ rather than σ̂.
  """
  timesteps, sigmas, init_sigma, opts = euler_schedule(process, num_inference_steps, **options)
  prediction = process.prediction
  num = len(timesteps)
  one = np.float32(1.0)
  sigma, sigma_next = sigmas[:num], sigmas[1:num + 1]
  s_tmin, s_tmax = np.float32(opts["s_tmin"]), np.float32(opts["s_tmax"])
  gamma_max = min(opts["s_churn"] / (len(sigmas) - 1), 2 ** 0.5 - 1)
  gammas = np.where((s_tmin <= sigma) & (sigma <= s_tmax), gamma_max, 0.0)
  sigma_hat = _f32(sigma * _f32(gammas + 1.0))
  churn = _f32(np.sqrt(np.maximum(sigma_hat * sigma_hat - sigma * sigma, 0)))
  stochastic = bool(np.any(gammas > 0))
  scale = _f32(np.sqrt(sigma * sigma + one))
  v_out = _f32(-sigma / scale)
  v_div = _f32(sigma * sigma + one)
  dt = _f32(sigma_next - sigma_hat)
  alpha, sigma_vp = _vp_alpha_sigma(sigma)
  s_noise = np.float32(opts["s_noise"])
  steps = tuple(jnp.asarray(a) for a in (np.arange(num), timesteps, scale, sigma_hat, churn,
                                         v_out, v_div, dt, alpha, sigma_vp, gammas > 0))

  def sample(model_fn, noise, key, cond_fn=None):
    def step(x, inputs):
      i, t, scale_i, sigma_hat_i, churn_i, v_out_i, v_div_i, dt_i, a_i, s_i, churned = inputs
      x_in = _div(x, scale_i)
      output = _model(model_fn, x_in, t)
      if cond_fn is not None:
        output = _guided(prediction, output, x_in, t, a_i, s_i, cond_fn)
      if stochastic:
        eps = _step_noise(key, i, x) * s_noise
        x = jnp.where(churned, x + eps * churn_i, x)
      if prediction == "epsilon":
        x0 = x - sigma_hat_i * output
      elif prediction == "v":
        x0 = output * v_out_i + _div(x, v_div_i)
      else:
        x0 = output
      derivative = _div(x - x0, sigma_hat_i)
      return x + derivative * dt_i, None

    x = noise.astype(jnp.float32) * init_sigma
    return jax.lax.scan(step, x, steps)[0]

  return sample


# -- Heun --------------------------------------------------------------------------
def heun_sampler(process, num_inference_steps, **options):
  """diffusers' `HeunDiscreteScheduler` as a jittable `sample(model_fn, noise, key,
  cond_fn=None)`: Heun's 2nd-order method on the probability-flow ODE (Karras et al.
  Alg. 1), 2N - 1 model evaluations, the last step (to σ = 0) a plain Euler step.

  One scan over the evaluations; even ones are Euler predictor stages (x' = x + d·dt,
  remembering x, d, dt), odd ones corrector stages (x ← x_saved + (d + d')/2·dt).
  diffusers' Heun has no zero-SNR option; for a zero-terminal-SNR process ᾱ_T is taken
  as 2**-24, as its Euler and DPM-Solver schedulers do.
  """
  timesteps, sigmas, init_sigma, opts = heun_schedule(process, num_inference_steps, **options)
  prediction = process.prediction
  clip = opts["clip_sample"]
  clip_range = float(opts["clip_sample_range"])
  num = len(timesteps)  # 2N - 1
  one = np.float32(1.0)
  corrector = np.arange(num) % 2 == 1
  # Predictor k (even) steps from sigmas[k] to sigmas[k + 1]; corrector k (odd) evaluates
  # at sigmas[k] (= the predictor's target) and reuses the predictor's dt.
  sig = sigmas[:num]
  first = np.where(corrector, np.arange(num) - 1, np.arange(num))
  dt = _f32(sigmas[first + 1] - sigmas[first])
  scale = _f32(np.sqrt(sig * sig + one))
  v_out = _f32(-sig / scale)
  v_div = _f32(sig * sig + one)
  alpha, sigma_vp = _vp_alpha_sigma(sig)
  steps = tuple(jnp.asarray(a) for a in (timesteps, sig, scale, v_out, v_div, dt, alpha,
                                         sigma_vp, corrector))

  def sample(model_fn, noise, key, cond_fn=None):
    del key  # deterministic

    def step(carry, inputs):
      x, x_saved, d_saved = carry
      t, sig_i, scale_i, v_out_i, v_div_i, dt_i, a_i, s_i, is_corrector = inputs
      x_in = _div(x, scale_i)
      output = _model(model_fn, x_in, t)
      if cond_fn is not None:
        output = _guided(prediction, output, x_in, t, a_i, s_i, cond_fn)
      if prediction == "epsilon":
        x0 = x - sig_i * output
      elif prediction == "v":
        x0 = output * v_out_i + _div(x, v_div_i)
      else:
        x0 = output
      if clip:
        x0 = jnp.clip(x0, -clip_range, clip_range)
      d = _div(x - x0, sig_i)
      predicted = x + d * dt_i
      corrected = x_saved + ((d_saved + d) / 2) * dt_i
      x_new = jnp.where(is_corrector, corrected, predicted)
      return (x_new, x, d), None

    x = noise.astype(jnp.float32) * init_sigma
    return jax.lax.scan(step, (x, x, jnp.zeros_like(x)), steps)[0][0]

  return sample


# -- DPM-Solver --------------------------------------------------------------------
def _dpm_orders(num, opts):
  """The order diffusers uses at each step (warm-up, lower_order_final, euler_at_final)."""
  order = opts["solver_order"]
  final_zero = opts["final_sigmas_type"] == "zero"
  short = opts["lower_order_final"] and num < 15
  orders = []
  for i in range(num):
    last = i == num - 1 and (opts["euler_at_final"] or short or final_zero)
    second_last = i == num - 2 and short
    if order == 1 or i < 1 or last:
      orders.append(1)
    elif order == 2 or i < 2 or second_last:
      orders.append(2)
    else:
      orders.append(3)
  return np.array(orders)


def _dpm_coefficients(sigmas, orders, algorithm, solver_type, alpha_sigma=_vp_alpha_sigma):
  """Per-step float32 scalars of x_next = cx·x + c0·D0 + c1·D1 + c2·D2 + cn·noise, with
  D1_0 = k0·(m0 - m1), D1_1 = k1·(m1 - m2), D1 = D1_0 + q·(D1_0 - D1_1),
  D2 = p·(D1_0 - D1_1) (m0 the newest converted model output), each computed with
  diffusers' float32 operation order; coefficients a step's order does not use are 0."""
  f = np.float32
  num = len(orders)
  alpha, sig = alpha_sigma(sigmas)
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    lam = (np.log(alpha) - np.log(sig)).astype(np.float32)
  coef = {k: np.zeros(num, np.float32) for k in ("cx", "c0", "c1", "c2", "cn", "k0", "k1",
                                                  "q", "p")}
  for i, order in enumerate(orders):
    a_t, s_t, a_s, s_s = alpha[i + 1], sig[i + 1], alpha[i], sig[i]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
      h = f(lam[i + 1] - lam[i])
      em, ep = f(np.exp(-h)), f(np.exp(h))
      em2, ep2 = f(np.exp(f(-2.0) * h)), f(np.exp(f(2.0) * h))
      if algorithm == "dpmsolver++":
        cx = f(s_t / s_s)
      elif algorithm == "sde-dpmsolver++":
        cx = f(f(s_t / s_s) * em)
      else:
        cx = f(a_t / a_s)
      if algorithm == "dpmsolver++":
        c0 = -f(a_t * f(em - f(1)))
      elif algorithm == "sde-dpmsolver++":
        c0 = f(a_t * f(f(1) - em2))
      elif algorithm == "dpmsolver":
        c0 = -f(s_t * f(ep - f(1)))
      else:
        c0 = -f(f(2) * f(s_t * f(ep - f(1))))
      if algorithm == "sde-dpmsolver++":
        cn = f(s_t * f(np.sqrt(f(f(1) - em2))))
      elif algorithm == "sde-dpmsolver":
        cn = f(s_t * f(np.sqrt(f(ep2 - f(1)))))
      else:
        cn = f(0)
      c1 = c2 = k0 = k1 = q = p = f(0)
      if order >= 2:
        h0 = f(lam[i] - lam[i - 1])
        r0 = f(h0 / h)
        k0 = f(f(1) / r0)
        # the D1 coefficient of the (midpoint | heun) second-order / third-order update
        plus_heun = f(a_t * f(f(em - f(1)) / h + f(1)))
        dpm_heun = -f(s_t * f(f(ep - f(1)) / h - f(1)))
        sdepp_heun = f(a_t * f(f(f(1) - em2) / f(f(-2.0) * h) + f(1)))
        if order == 2 and solver_type == "midpoint":
          c1 = {"dpmsolver++": -f(f(0.5) * f(a_t * f(em - f(1)))),
                "dpmsolver": -f(f(0.5) * f(s_t * f(ep - f(1)))),
                "sde-dpmsolver++": f(f(0.5) * f(a_t * f(f(1) - em2))),
                "sde-dpmsolver": -f(s_t * f(ep - f(1)))}[algorithm]
        elif order == 2 or algorithm != "sde-dpmsolver":
          c1 = {"dpmsolver++": plus_heun, "dpmsolver": dpm_heun, "sde-dpmsolver++": sdepp_heun,
                "sde-dpmsolver": -f(f(2) * f(s_t * f(f(ep - f(1)) / h - f(1))))}[algorithm]
        if order == 3:
          h1 = f(lam[i - 1] - lam[i - 2])
          r1 = f(h1 / h)
          k1 = f(f(1) / r1)
          q = f(r0 / f(r0 + r1))
          p = f(f(1) / f(r0 + r1))
          c2 = {"dpmsolver++": -f(a_t * f(f(f(em - f(1)) + h) / f(h * h) - f(0.5))),
                "dpmsolver": -f(s_t * f(f(f(ep - f(1)) - h) / f(h * h) - f(0.5))),
                "sde-dpmsolver++": f(a_t * f(f(f(f(1) - em2) - f(f(2) * h))
                                             / f(f(f(2) * h) * f(f(2) * h)) - f(0.5)))}[algorithm]
    for k, v in dict(cx=cx, c0=c0, c1=c1, c2=c2, cn=cn, k0=k0, k1=k1, q=q, p=p).items():
      coef[k][i] = v
  return coef


def dpm_solver_sampler(process, num_inference_steps, **options):
  """diffusers' `DPMSolverMultistepScheduler` as a jittable `sample(model_fn, noise, key,
  cond_fn=None)`: DPM-Solver (ε form) / DPM-Solver++ (x0 form), ODE or SDE variants,
  multistep orders 1-3 with diffusers' warm-up and final-step order rules.

  Model outputs beyond x.shape[-1] channels are always dropped (diffusers' "learned"
  variance_type takes `[:, :3]`, i.e. assumes 3 channels). Thresholding (Imagen dynamic
  thresholding) applies to the predicted x0, as in diffusers.

  On a `RectifiedFlow` process (diffusers' use_flow_sigmas=True with
  prediction_type="flow_prediction", e.g. SANA) the model predicts the velocity v,
  x0 = x - σ·v, with α = 1 - σ and σ_t = σ; flow_shift defaults to the process's shift,
  and `mu` (use_dynamic_shifting) replaces it by e^mu. Classifier guidance (cond_fn)
  needs a Gaussian process.
  """
  flow = isinstance(process, RectifiedFlow)
  if flow and options.get("flow_shift") is None:
    options = dict(options, flow_shift=process.shift)
  timesteps, sigmas, opts = dpm_solver_schedule(process, num_inference_steps, **options)
  algorithm = opts["algorithm_type"]
  prediction = "flow" if flow else process.prediction
  num = len(timesteps)
  orders = _dpm_orders(num, opts)
  alpha_sigma = _flow_alpha_sigma if flow else _vp_alpha_sigma
  coef = _dpm_coefficients(sigmas, orders, algorithm, opts["solver_type"], alpha_sigma)
  alpha, sig = alpha_sigma(sigmas[:num])
  plus = algorithm in ("dpmsolver++", "sde-dpmsolver++")
  sde = algorithm.startswith("sde")
  use_m2 = bool(np.any(orders == 3))
  threshold = dict(thresholding=bool(opts["thresholding"]),
                   dynamic_thresholding_ratio=float(opts["dynamic_thresholding_ratio"]),
                   sample_max_value=float(opts["sample_max_value"]))
  steps = (jnp.arange(num), jnp.asarray(timesteps.astype(np.float32)), jnp.asarray(alpha),
           jnp.asarray(sig)) + tuple(jnp.asarray(coef[k]) for k in
                                     ("cx", "c0", "c1", "c2", "cn", "k0", "k1", "q", "p"))

  def convert(output, x, a, s):
    """diffusers' `convert_model_output`: x0 (DPM-Solver++) or ε (DPM-Solver)."""
    if plus:
      if prediction == "epsilon":
        x0 = _div(x - s * output, a)
      elif prediction == "v":
        x0 = a * x - s * output
      elif prediction == "flow":
        x0 = x - s * output
      else:
        x0 = output
      return threshold_x0(x0, **threshold)
    if prediction == "epsilon":
      eps = output
    elif prediction == "x0":
      eps = _div(x - a * output, s)
    else:
      eps = a * output + s * x
    if threshold["thresholding"]:
      x0 = threshold_x0(_div(x - s * eps, a), **threshold)
      eps = _div(x - a * x0, s)
    return eps

  def sample(model_fn, noise, key, cond_fn=None):
    check(not (flow and cond_fn is not None),
          "dpm_solver: classifier guidance (cond_fn) needs a gaussian process")

    def step(carry, inputs):
      x, m1, m2 = carry
      i, t, a, s, cx, c0, c1, c2, cn, k0, k1, q, p = inputs
      output = _model(model_fn, x, t)
      if cond_fn is not None:
        output = _guided(prediction, output, x, t, a, s, cond_fn)
      m0 = convert(output, x, a, s)
      d1_0 = k0 * (m0 - m1)
      if use_m2:
        d1_1 = k1 * (m1 - m2)
        d1 = d1_0 + q * (d1_0 - d1_1)
        d2 = p * (d1_0 - d1_1)
        x_next = cx * x + c0 * m0 + c1 * d1 + c2 * d2
      else:
        x_next = cx * x + c0 * m0 + c1 * d1_0
      if sde:
        x_next = x_next + cn * _step_noise(key, i, x)
      return (x_next, m0, m1), None

    x = noise.astype(jnp.float32)  # init_noise_sigma = 1
    zeros = jnp.zeros_like(x)
    return jax.lax.scan(step, (x, zeros, zeros), steps)[0][0]

  return sample
