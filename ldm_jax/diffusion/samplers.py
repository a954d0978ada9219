"""Samplers for `GaussianDiffusion` and `RectifiedFlow`, as builders:

  sampler = ddpm_sampler(process, num_inference_steps, **options)
  x0 = sampler(model_fn, noise, key, cond_fn=None)

Each builder computes its whole schedule on the host (numpy, in diffusers' dtypes and
operation order) and returns a jittable function that runs one `jax.lax.scan`,
deterministic given `key` (a stochastic step i draws `normal(fold_in(key, i))`).
`options` are exactly the configuration keys of the matching diffusers scheduler
(`DDPMScheduler`, `DDIMScheduler`, `FlowMatchEulerDiscreteScheduler`), with its
defaults, plus the arguments of its `set_timesteps` / `step` that choose the schedule
or the update (DDPM `timesteps`, DDIM `eta` and `use_clipped_model_output`, flow
`sigmas`, `timesteps`, `mu`); trajectories match the diffusers loop to float32
rounding. Keys that describe the process (num_train_timesteps, beta_*, trained_betas,
prediction_type, rescale_betas_zero_snr) come from the process, not from options.
Extra: `respacing` ("250", "ddim25", "10,10,5"), guided-diffusion's timestep respacing.

  model_fn(x, model_time) -> output   model_time (B,) float32 is what diffusers passes
                                      to the model as `timestep` (guidance folded in).
  noise                               a standard-normal x_T (scaled by the scheduler's
                                      init_noise_sigma where it is not 1).
  cond_fn(x_t, model_time) -> g       optional classifier guidance (Dhariwal & Nichol
                                      2021), g = s·∇_x log p(y | x_t).

`run_sampler` / `check_sample_config` build the sampler named in `config.sample`,
including the σ-space samplers of `sigma_samplers.py` (euler, heun, dpm_solver).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.flow import RectifiedFlow, shift_time
from ldm_jax.diffusion.gaussian import GaussianDiffusion
from ldm_jax.errors import UserError, check

SPACINGS = ("leading", "trailing", "linspace")
DDPM_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log",
                  "learned", "learned_range", "learned_log")
LEARNED_DDPM_VARIANCES = ("learned", "learned_range", "learned_log")
TIME_SHIFT_TYPES = ("exponential", "linear")

_THRESHOLD_DEFAULTS = dict(clip_sample=True, clip_sample_range=1.0, thresholding=False,
                           dynamic_thresholding_ratio=0.995, sample_max_value=1.0)
DDPM_OPTIONS = dict(timestep_spacing="leading", steps_offset=0, variance_type=None,
                    **_THRESHOLD_DEFAULTS, timesteps=None, respacing=None)
DDIM_OPTIONS = dict(timestep_spacing="leading", steps_offset=0, set_alpha_to_one=True,
                    **_THRESHOLD_DEFAULTS, eta=0.0, use_clipped_model_output=False,
                    respacing=None)
FLOW_EULER_OPTIONS = dict(shift=None, use_dynamic_shifting=False, base_shift=0.5,
                          max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
                          invert_sigmas=False, shift_terminal=None, use_karras_sigmas=False,
                          use_exponential_sigmas=False, use_beta_sigmas=False,
                          time_shift_type="exponential", stochastic_sampling=False,
                          mu=None, image_seq_len=None, sigmas=None, timesteps=None)


def resolve_options(sampler: str, defaults: dict, options: dict) -> dict:
  """`defaults` updated with `options`; an unknown key is a UserError listing the valid
  ones. Values of None mean "the default"."""
  unknown = sorted(set(options) - set(defaults))
  check(not unknown, f"unknown option(s) {unknown} for the {sampler} sampler; "
                     f"valid: {sorted(defaults)}")
  resolved = dict(defaults)
  resolved.update({k: v for k, v in options.items() if v is not None})
  return resolved


def _check_choice(sampler, name, value, valid):
  check(value in valid, f"{sampler} option {name}={value!r} is not supported; valid: {list(valid)}")


def _bcast(values, x):
  """Per-example (B,) or scalar -> broadcastable against x (B, ...)."""
  values = jnp.asarray(values)
  return values.reshape(values.shape + (1,) * (x.ndim - values.ndim)) if values.ndim else values


# -- x0 clipping / dynamic thresholding --------------------------------------
def threshold_x0(x0, *, clip_sample: bool = False, clip_sample_range: float = 1.0,
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 sample_max_value: float = 1.0):
  """Clips or dynamically thresholds a predicted clean sample x0 (B, ...), as diffusers'
  schedulers do with their options of the same names.

  thresholding (Imagen, Saharia et al. 2022 §2.3; wins over clip_sample): per example,
    s = the `dynamic_thresholding_ratio` quantile of |x0| over all non-batch axes
    (linear interpolation, as `torch.quantile`), clamped to [1, sample_max_value]
    (to sample_max_value when that is < 1); then x0 <- clip(x0, -s, s) / s.
  clip_sample: x0 <- clip(x0, -clip_sample_range, clip_sample_range).
  Neither: x0 unchanged. Jittable; the options must be Python values.
  """
  if thresholding:
    check(0.0 <= dynamic_thresholding_ratio <= 1.0,
          f"dynamic_thresholding_ratio={dynamic_thresholding_ratio!r} must be in [0, 1]")
    flat = jnp.abs(x0.reshape(x0.shape[0], -1).astype(jnp.float32))
    n = flat.shape[1]
    # torch.quantile's rank arithmetic, in float32 on the host.
    rank = np.float32(dynamic_thresholding_ratio) * np.float32(n - 1)
    lo, hi = int(np.floor(rank)), int(np.ceil(rank))
    weight = np.float32(rank - np.float32(lo))
    top = jax.lax.top_k(flat, n - lo)[0]  # descending: top[:, n-1-j] is the j-th smallest
    v_lo, v_hi = top[:, n - 1 - lo], top[:, n - 1 - hi]
    if weight < 0.5:  # torch.lerp's two branches
      s = v_lo + weight * (v_hi - v_lo)
    else:
      s = v_hi - (v_hi - v_lo) * (np.float32(1.0) - weight)
    s = jnp.minimum(jnp.maximum(s, 1.0), sample_max_value)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    return jnp.clip(x0, -s, s) / s
  if clip_sample:
    return jnp.clip(x0, -clip_sample_range, clip_sample_range)
  return x0


# -- timestep schedules ------------------------------------------------------
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


RESPACE_HELP = "'N', 'ddimN' or comma-separated counts such as '10,10,5'"


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
  check(spacing in SPACINGS + ("respace",),
        f"timestep_spacing={spacing!r} is not supported; valid: {list(SPACINGS)}")
  if spacing == "respace":
    try:
      timesteps = respaced_timesteps(num_timesteps, str(num_steps))[::-1]
    except ValueError as e:
      raise UserError(f"bad respacing {num_steps!r} for {num_timesteps} timesteps "
                      f"(valid: {RESPACE_HELP}): {e}") from e
    n = len(timesteps)
  else:
    check(isinstance(num_steps, (int, np.integer)) and 1 <= num_steps <= num_timesteps,
          f"num_inference_steps={num_steps!r} must be an int in [1, {num_timesteps}] "
          f"(the training timesteps)")
    n = int(num_steps)
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


def _gaussian_schedule(sampler, process, num_inference_steps, opts, user_keys, prev_rule):
  """(timesteps, prev) for a DDPM / DDIM builder from its resolved options."""
  T = process.num_timesteps
  respacing = opts["respacing"]
  custom = opts.get("timesteps")
  if respacing:
    clash = sorted(k for k in ("timestep_spacing", "steps_offset", "timesteps") if k in user_keys)
    check(not clash, f"{sampler}: respacing={respacing!r} replaces {clash}; set only one")
    ts, prev = gaussian_timesteps(T, str(respacing), "respace", prev_rule="list")
    check(num_inference_steps is None or num_inference_steps == len(ts),
          f"{sampler}: respacing={respacing!r} gives {len(ts)} steps but "
          f"num_inference_steps={num_inference_steps}; pass None")
    return ts, prev
  if custom is not None:
    custom = [int(t) for t in custom]
    check(num_inference_steps is None or num_inference_steps == len(custom),
          f"{sampler}: custom timesteps has {len(custom)} entries but "
          f"num_inference_steps={num_inference_steps}; pass None")
    check(len(custom) >= 1 and all(b < a for a, b in zip(custom, custom[1:])),
          f"{sampler}: custom timesteps {custom} must be non-empty and strictly descending")
    check(0 <= custom[-1] and custom[0] < T,
          f"{sampler}: custom timesteps {custom} must lie in [0, {T - 1}]")
    ts = np.asarray(custom, np.int32)
    return ts, np.append(ts[1:], -1).astype(np.int32)
  _check_choice(sampler, "timestep_spacing", opts["timestep_spacing"], SPACINGS)
  check(isinstance(opts["steps_offset"], (int, np.integer)) and opts["steps_offset"] >= 0,
        f"{sampler}: steps_offset={opts['steps_offset']!r} must be an int >= 0")
  ts, prev = gaussian_timesteps(T, num_inference_steps, opts["timestep_spacing"],
                                opts["steps_offset"], prev_rule)
  check(int(ts.max()) < T, f"{sampler}: steps_offset={opts['steps_offset']} moves the first "
                           f"timestep to {int(ts.max())}, past the last training timestep {T - 1}")
  return ts, prev


def _threshold_options(sampler, opts):
  """The threshold_x0 keyword arguments from resolved options, validated."""
  kw = {k: opts[k] for k in _THRESHOLD_DEFAULTS}
  for k in ("clip_sample", "thresholding"):
    check(isinstance(kw[k], (bool, np.bool_)), f"{sampler} option {k}={kw[k]!r} must be a bool")
  check(0.0 <= kw["dynamic_thresholding_ratio"] <= 1.0,
        f"{sampler} option dynamic_thresholding_ratio={kw['dynamic_thresholding_ratio']!r} "
        f"must be in [0, 1]")
  return kw


def _check_process(sampler, process, kind):
  want = GaussianDiffusion if kind == "gaussian" else RectifiedFlow
  check(isinstance(process, want),
        f"the {sampler} sampler needs a {kind} process, got {type(process).__name__}")


def _x0_eps(prediction, output, x, sqrt_abar, sqrt_one_minus):
  """(x0, ε) from the model output at x_t, in diffusers' expressions."""
  if prediction == "epsilon":
    return (x - sqrt_one_minus * output) / sqrt_abar, output
  if prediction == "x0":
    return output, (x - sqrt_abar * output) / sqrt_one_minus
  return sqrt_abar * x - sqrt_one_minus * output, sqrt_abar * output + sqrt_one_minus * x


def _model_time(t, x):
  return jnp.full((x.shape[0],), t, jnp.float32)


# -- DDPM --------------------------------------------------------------------
def _ddpm_coefficients(alphas_cumprod, timesteps, prev_timesteps):
  """Per-step float32 constants of DDPMScheduler.step, in its operation order."""
  one = np.float32(1.0)
  abar_t = alphas_cumprod[timesteps]
  abar_prev = np.where(prev_timesteps >= 0, alphas_cumprod[np.maximum(prev_timesteps, 0)],
                       one).astype(np.float32)
  beta_prod_t, beta_prod_prev = one - abar_t, one - abar_prev
  current_alpha = abar_t / abar_prev
  current_beta = one - current_alpha
  variance = np.maximum((one - abar_prev) / (one - abar_t) * current_beta, np.float32(1e-20))
  return dict(
      sqrt_abar=np.sqrt(abar_t), sqrt_one_minus=np.sqrt(beta_prod_t),
      coef_x0=np.sqrt(abar_prev) * current_beta / beta_prod_t,
      coef_xt=np.sqrt(current_alpha) * beta_prod_prev / beta_prod_t,
      small=variance, large=current_beta,
      small_log_std=np.exp(np.float32(0.5) * np.log(variance)),
      large_log_std=np.exp(np.float32(0.5) * np.log(current_beta)),
      min_log=np.log(variance), max_log=np.log(current_beta))


def ddpm_sampler(process: GaussianDiffusion, num_inference_steps=None, **options):
  """Ancestral sampling (Ho et al. 2020, eq. 6-7) over a possibly respaced chain: the
  trajectory of diffusers' `DDPMScheduler` with the same options.

  Options (diffusers' names and defaults): timestep_spacing ("leading" | "trailing" |
  "linspace"), steps_offset, variance_type, clip_sample (True), clip_sample_range,
  thresholding, dynamic_thresholding_ratio, sample_max_value, timesteps (a custom
  strictly descending list; num_inference_steps then None), respacing
  (guided-diffusion's "250" / "ddim25" / "10,10,5"; replaces the spacing).

  variance_type (default: the process's `variance_type`, "fixed_small" when it has
  none; diffusers' default is "fixed_small"): fixed_small (the posterior variance β̃_t),
  fixed_large (β_t),
  fixed_small_log / fixed_large_log (the same through exp(½·log)), learned (the model's
  extra channels output[..., C:2C] ARE the variance, as diffusers reads them),
  learned_range (those channels v ∈ [-1, 1] interpolate the log-variance between
  log β̃_t and log β_t: Nichol & Dhariwal 2021, eq. 15), and, not in diffusers,
  learned_log (the extra channels are log Σ: guided-diffusion's LEARNED, what a process
  with variance_type="learned" trains). Between consecutive sampled
  timesteps the chain uses β_t = 1 - ᾱ_t/ᾱ_prev, which is exactly guided-diffusion's
  respaced process, so learned_range here is ADM / DiT learned-Σ sampling (the one
  difference, guided-diffusion's clipped log-variance at t = 0, sits on the final,
  noiseless step and only touches `cond_fn`'s Σ there).

  Step i draws normal(fold_in(key, i)); no noise is added at t == 0. cond_fn's g moves
  the mean by Σ_t·g (guided-diffusion's condition_mean), Σ_t the variance of the step.

  diffusers' fixed_large_log samples NaN (it takes the square root of log β_t, which is
  negative); here fixed_large_log is what its name says, std = exp(½·log β_t).
  """
  _check_process("ddpm", process, "gaussian")
  user_keys = {k for k, v in options.items() if v is not None}
  opts = resolve_options("ddpm", DDPM_OPTIONS, options)
  if opts["variance_type"] is None:
    trained = getattr(process, "variance_type", "fixed_small")
    opts["variance_type"] = "learned_log" if trained == "learned" else trained
  variance_type = opts["variance_type"]
  _check_choice("ddpm", "variance_type", variance_type, DDPM_VARIANCES)
  threshold = _threshold_options("ddpm", opts)
  timesteps, prev = _gaussian_schedule("ddpm", process, num_inference_steps, opts, user_keys,
                                       "list")
  c = _ddpm_coefficients(np.asarray(process.alphas_cumprod, np.float32), timesteps, prev)
  var, std = {
      "fixed_small": (c["small"], np.sqrt(c["small"])),
      "fixed_small_log": (c["small"], c["small_log_std"]),
      "fixed_large": (c["large"], np.sqrt(c["large"])),
      "fixed_large_log": (c["large"], c["large_log_std"]),
  }.get(variance_type, (c["small"], np.sqrt(c["small"])))
  prediction = process.prediction
  steps = (np.arange(len(timesteps)), timesteps.astype(np.float32), c["sqrt_abar"],
           c["sqrt_one_minus"], c["coef_x0"], c["coef_xt"], var, std, c["min_log"],
           c["max_log"], timesteps > 0)

  def sample(model_fn, noise, key, cond_fn=None):
    channels = noise.shape[-1]

    def step(x, inputs):
      i, t, sqrt_abar, sqrt_one_minus, coef_x0, coef_xt, var, std, min_log, max_log, noisy = (
          inputs)
      model_time = _model_time(t, x)
      output = model_fn(x, model_time)
      x0, _ = _x0_eps(prediction, output[..., :channels], x, sqrt_abar, sqrt_one_minus)
      x0 = threshold_x0(x0, **threshold)
      mean = coef_x0 * x0 + coef_xt * x
      if variance_type in LEARNED_DDPM_VARIANCES:
        check(output.shape[-1] == 2 * channels,
              f"ddpm variance_type={variance_type!r} reads the variance from the model's "
              f"extra channels: the model must output {2 * channels} channels, got "
              f"{output.shape[-1]}")
        predicted = output[..., channels:]
        if variance_type == "learned":
          var, std = predicted, jnp.sqrt(predicted)
        elif variance_type == "learned_log":
          var, std = jnp.exp(predicted), jnp.exp(0.5 * predicted)
        else:
          frac = (predicted + 1) / 2
          log_var = frac * max_log + (1 - frac) * min_log
          var, std = jnp.exp(log_var), jnp.exp(0.5 * log_var)
      if cond_fn is not None:
        mean = mean + var * cond_fn(x, model_time)
      z = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
      return jnp.where(noisy, mean + std * z, mean), None

    return jax.lax.scan(step, noise, tuple(jnp.asarray(s) for s in steps))[0]

  sample.timesteps = timesteps
  return sample


# -- DDIM --------------------------------------------------------------------
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


def ddim_sampler(process: GaussianDiffusion, num_inference_steps=None, **options):
  """DDIM (Song et al. 2021, eq. 12): the trajectory of diffusers' `DDIMScheduler`.

  Options (diffusers' names and defaults): timestep_spacing, steps_offset,
  set_alpha_to_one (ᾱ after the last step: 1, or ᾱ_0), clip_sample (True),
  clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value, and its
  step arguments eta (0 = deterministic, 1 = DDPM-like) and use_clipped_model_output;
  respacing (guided-diffusion's; the step then goes to the next sampled timestep, as
  guided-diffusion, instead of diffusers' t - T//n).

  Step i draws normal(fold_in(key, i)) when η > 0. cond_fn: guided-diffusion's
  condition_score, ε̂ = ε(x0) - sqrt(1-ᾱ_t)·g with ε(x0) re-derived from the (clipped)
  x0, then x0 re-derived from ε̂.
  """
  _check_process("ddim", process, "gaussian")
  user_keys = {k for k, v in options.items() if v is not None}
  opts = resolve_options("ddim", DDIM_OPTIONS, options)
  threshold = _threshold_options("ddim", opts)
  eta = opts["eta"]
  check(isinstance(eta, (int, float)) and eta >= 0, f"ddim option eta={eta!r} must be >= 0")
  for k in ("set_alpha_to_one", "use_clipped_model_output"):
    check(isinstance(opts[k], (bool, np.bool_)), f"ddim option {k}={opts[k]!r} must be a bool")
  timesteps, prev = _gaussian_schedule("ddim", process, num_inference_steps, opts, user_keys,
                                       "list" if opts["respacing"] else "stride")
  alphas_cumprod = np.asarray(process.alphas_cumprod, np.float32)
  final = np.float32(1.0) if opts["set_alpha_to_one"] else alphas_cumprod[0]
  abar_prev, std, direction = _ddim_coefficients(alphas_cumprod, timesteps, prev, eta, final)
  abar_t = alphas_cumprod[timesteps]
  prediction, clipped_eps = process.prediction, opts["use_clipped_model_output"]
  steps = (np.arange(len(timesteps)), timesteps.astype(np.float32), np.sqrt(abar_t),
           np.sqrt(np.float32(1.0) - abar_t), np.sqrt(abar_prev), std, direction)

  def sample(model_fn, noise, key, cond_fn=None):
    channels = noise.shape[-1]

    def step(x, inputs):
      i, t, sqrt_abar, sqrt_one_minus, sqrt_abar_prev, std, direction = inputs
      model_time = _model_time(t, x)
      output = model_fn(x, model_time)[..., :channels]
      x0, eps = _x0_eps(prediction, output, x, sqrt_abar, sqrt_one_minus)
      x0 = threshold_x0(x0, **threshold)
      if clipped_eps or cond_fn is not None:
        eps = (x - sqrt_abar * x0) / sqrt_one_minus
      if cond_fn is not None:
        eps = eps - sqrt_one_minus * cond_fn(x, model_time)
        x0 = (x - sqrt_one_minus * eps) / sqrt_abar
      x = sqrt_abar_prev * x0 + direction * eps
      if eta > 0:
        x = x + std * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
      return x, None

    return jax.lax.scan(step, noise, tuple(jnp.asarray(s) for s in steps))[0]

  sample.timesteps = timesteps
  return sample


# -- flow matching Euler -----------------------------------------------------
def flow_sigmas(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000):
  """σ schedule of diffusers' FlowMatchEulerDiscreteScheduler with a static shift and
  no other option, the terminal 0 appended: (num_steps + 1,) float32."""
  return flow_schedule(num_steps, num_train_timesteps, shift=shift)[0]


def _flow_mu(opts):
  """`mu` of dynamic shifting: given, or from image_seq_len as the diffusers pipelines
  (Flux, SD3) compute it: linear in the sequence length through (base_image_seq_len,
  base_shift) and (max_image_seq_len, max_shift)."""
  mu, seq_len = opts["mu"], opts["image_seq_len"]
  if not opts["use_dynamic_shifting"]:
    check(mu is None and seq_len is None,
          "flow_euler: mu / image_seq_len only apply with use_dynamic_shifting=True "
          f"(got mu={mu!r}, image_seq_len={seq_len!r})")
    return None
  check((mu is None) != (seq_len is None),
        "flow_euler: use_dynamic_shifting=True needs exactly one of mu and image_seq_len "
        f"(got mu={mu!r}, image_seq_len={seq_len!r})")
  if mu is not None:
    return float(mu)
  slope = (opts["max_shift"] - opts["base_shift"]) / (
      opts["max_image_seq_len"] - opts["base_image_seq_len"])
  intercept = opts["base_shift"] - slope * opts["base_image_seq_len"]
  return seq_len * slope + intercept


def flow_schedule(num_inference_steps, num_train_timesteps: int = 1000, **options):
  """(sigmas (n+1,), model times (n,)) float32 of FlowMatchEulerDiscreteScheduler.

  As diffusers: the training grid (float32, shifted unless dynamic shifting) fixes
  σ_max and σ_min; the inference grid is linear between them in float64 (or the given
  `sigmas` / `timesteps`, float32), then shifted (static `shift`, or dynamic with `mu`:
  exponential e^μ/(e^μ + (1/σ - 1)), linear μ/(μ + (1/σ - 1))), stretched so that it
  ends at `shift_terminal`, optionally re-spaced (Karras ρ = 7, exponential, or
  Beta(0.6, 0.6) quantiles) between its ends, rounded to float32; the model time is
  σ·T (or the given timesteps). `invert_sigmas` runs σ' = 1 - σ towards 1.
  """
  opts = resolve_options("flow_euler", FLOW_EULER_OPTIONS, options)
  T = int(num_train_timesteps)
  shift = 1.0 if opts["shift"] is None else float(opts["shift"])
  check(shift > 0, f"flow_euler option shift={shift!r} must be > 0")
  _check_choice("flow_euler", "time_shift_type", opts["time_shift_type"], TIME_SHIFT_TYPES)
  spacings = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
              if opts[k]]
  check(len(spacings) <= 1, f"flow_euler: only one of {spacings} can be True")
  mu = _flow_mu(opts)
  custom_sigmas, custom_times = opts["sigmas"], opts["timesteps"]
  if custom_sigmas is not None and custom_times is not None:
    check(len(custom_sigmas) == len(custom_times),
          f"flow_euler: sigmas ({len(custom_sigmas)}) and timesteps ({len(custom_times)}) "
          f"must have the same length")
  custom = custom_sigmas if custom_sigmas is not None else custom_times
  if custom is not None:
    check(len(custom) >= 1, "flow_euler: custom sigmas / timesteps must not be empty")
    check(num_inference_steps is None or num_inference_steps == len(custom),
          f"flow_euler: custom sigmas / timesteps have {len(custom)} entries but "
          f"num_inference_steps={num_inference_steps}; pass None")
    n = len(custom)
  else:
    check(isinstance(num_inference_steps, (int, np.integer)) and num_inference_steps >= 1,
          f"flow_euler: num_inference_steps={num_inference_steps!r} must be an int >= 1")
    n = int(num_inference_steps)

  # The training grid's ends (float32 as diffusers' __init__).
  train_max, train_min = np.float32(1.0), np.float32(1.0) / np.float32(T)
  if not opts["use_dynamic_shifting"]:
    train_max, train_min = shift_time(train_max, shift), shift_time(train_min, shift)
  sigma_max, sigma_min = float(train_max), float(train_min)

  times = None if custom_times is None else np.array(custom_times).astype(np.float32)
  if custom_sigmas is not None:
    sigmas = np.array(custom_sigmas).astype(np.float32)
  else:
    if times is None:
      grid = np.linspace(sigma_max * T, sigma_min * T, n)
    else:
      grid = times
    sigmas = grid / T
  if opts["use_dynamic_shifting"]:
    if opts["time_shift_type"] == "exponential":
      sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
    else:
      sigmas = mu / (mu + (1 / sigmas - 1) ** 1.0)
  else:
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
  if opts["shift_terminal"]:
    one_minus = 1 - sigmas
    sigmas = 1 - one_minus / (one_minus[-1] / (1 - opts["shift_terminal"]))
  if spacings:
    high, low = sigmas[0].item(), sigmas[-1].item()
    if opts["use_karras_sigmas"]:
      ramp = np.linspace(0, 1, n)
      inv_high, inv_low = high ** (1 / 7.0), low ** (1 / 7.0)
      sigmas = (inv_high + ramp * (inv_low - inv_high)) ** 7.0
    elif opts["use_exponential_sigmas"]:
      sigmas = np.exp(np.linspace(math.log(high), math.log(low), n))
    else:
      import scipy.stats  # pylint: disable=import-outside-toplevel
      quantiles = [scipy.stats.beta.ppf(u, 0.6, 0.6) for u in 1 - np.linspace(0, 1, n)]
      sigmas = np.array([low + q * (high - low) for q in quantiles])
  sigmas = np.asarray(sigmas).astype(np.float32)
  times = sigmas * T if times is None else times
  if opts["invert_sigmas"]:
    sigmas = np.float32(1.0) - sigmas
    times = sigmas * T
    end = np.float32(1.0)
  else:
    end = np.float32(0.0)
  sigmas = np.append(sigmas, end).astype(np.float32)
  check(np.all(np.isfinite(sigmas)), f"flow_euler: the options give non-finite sigmas {sigmas}")
  return sigmas, np.asarray(times, np.float32)


def flow_euler_sampler(process: RectifiedFlow, num_inference_steps=None, **options):
  """Euler on the flow ODE dx/dσ = v from σ_0 (noise) to σ_n = 0: the trajectory of
  diffusers' `FlowMatchEulerDiscreteScheduler` with the same options.

  Options (diffusers' names and defaults, see `flow_schedule`): shift (default: the
  process's shift), use_dynamic_shifting, base_shift, max_shift, base_image_seq_len,
  max_image_seq_len, time_shift_type, shift_terminal, use_karras_sigmas,
  use_exponential_sigmas, use_beta_sigmas, invert_sigmas, stochastic_sampling; and the
  set_timesteps arguments mu (dynamic shifting; or image_seq_len, from which mu is
  computed as the Flux / SD3 pipelines do), sigmas and timesteps (custom lists;
  num_inference_steps then None).

  stochastic_sampling: each step re-noises the predicted x0 = x - σ·v to the next σ,
  x ← (1-σ')·x0 + σ'·normal(fold_in(key, i)), instead of the Euler step.
  cond_fn is not supported here (it is a Gaussian-process notion).
  """
  _check_process("flow_euler", process, "flow")
  if options.get("shift") is None:
    options = dict(options, shift=process.shift)
  sigmas, times = flow_schedule(num_inference_steps, process.num_train_timesteps, **options)
  stochastic = bool(options.get("stochastic_sampling", False))
  steps = (np.arange(len(times)), times, sigmas[:-1], sigmas[1:], sigmas[1:] - sigmas[:-1],
           np.float32(1.0) - sigmas[1:])

  def sample(model_fn, noise, key, cond_fn=None, pass_step_index=False):
    """`pass_step_index`: call model_fn(x, t, i) with the step's index i (traced), for
    guidance that depends on the step (the SD3 pipeline's skip-layer window)."""
    check(cond_fn is None, "flow_euler: classifier guidance (cond_fn) needs a gaussian process")
    channels = noise.shape[-1]

    def step(x, inputs):
      i, t, sigma, sigma_next, dt, one_minus_next = inputs
      model_time = _model_time(t, x)
      velocity = (model_fn(x, model_time, i) if pass_step_index
                  else model_fn(x, model_time))[..., :channels]
      if stochastic:
        x0 = x - sigma * velocity
        z = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        return one_minus_next * x0 + sigma_next * z, None
      return x + dt * velocity, None

    return jax.lax.scan(step, noise, tuple(jnp.asarray(s) for s in steps))[0]

  sample.timesteps = times
  sample.sigmas = sigmas
  return sample


# -- config.sample -> a sampler ------------------------------------------------
GAUSSIAN_SAMPLERS = ("ddpm", "ddim", "euler", "heun", "dpm_solver")
FLOW_SAMPLERS = ("euler",)
SAMPLERS = {"gaussian": GAUSSIAN_SAMPLERS, "flow": FLOW_SAMPLERS}
ALIASES = {"dpmpp": "dpm_solver", "dpm++": "dpm_solver", "flow_euler": "euler"}
# Flat `config.sample` keys of earlier versions: accepted at their old default (a no-op),
# otherwise an error saying where the option lives now.
LEGACY_KEYS = {"timestep_spacing": ("leading", "sample.options.timestep_spacing"),
               "steps_offset": (0, "sample.options.steps_offset"),
               "eta": (0.0, "sample.options.eta"),
               "variance": ("fixed_small", "sample.options.variance_type"),
               "clip_x0": (0.0, "sample.options.clip_sample / clip_sample_range"),
               "final_alpha_bar": (1.0, "sample.options.set_alpha_to_one")}


def builder(process, name: str):
  """The sampler builder `name` ("ddpm", "ddim", "euler", "heun", "dpm_solver") for
  `process`; "euler" on a flow process is the flow-matching Euler sampler."""
  kind = "flow" if isinstance(process, RectifiedFlow) else "gaussian"
  name = ALIASES.get(name, name)
  check(name in SAMPLERS[kind],
        f"sample.sampler={name!r} does not apply to a {kind} process; valid: "
        f"{list(SAMPLERS[kind])}")
  if kind == "flow":
    return flow_euler_sampler
  if name in ("ddpm", "ddim"):
    return {"ddpm": ddpm_sampler, "ddim": ddim_sampler}[name]
  try:
    from ldm_jax.diffusion import sigma_samplers  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise UserError(f"sample.sampler={name!r} is not available in this build ({e})") from e
  return getattr(sigma_samplers, f"{name}_sampler")


def _config_options(sample_config) -> dict:
  """The sampler options set in `config.sample.options` (None = the default) plus
  `config.sample.respacing`; legacy flat keys are checked."""
  for key, (default, where) in LEGACY_KEYS.items():
    value = sample_config.get(key, default)
    check(value == default or (key == "clip_x0" and not value),
          f"sample.{key}={value!r} is no longer read: set {where} instead (diffusers' "
          f"option names, see ldm_jax/diffusion/samplers.py)")
  options = sample_config.get("options", None) or {}
  options = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(options).items()
             if v is not None}
  respacing = sample_config.get("respacing", "")
  if respacing:
    options["respacing"] = str(respacing)
  return options


def build_sampler(process, sample_config):
  """The sample function `(model_fn, noise, key, cond_fn=None) -> x` that `config.sample`
  describes (sampler, num_steps, options, respacing); option errors are UserErrors."""
  name = sample_config.sampler
  make = builder(process, name)
  options = _config_options(sample_config)
  if ALIASES.get(name, name) == "ddim" and not isinstance(process, RectifiedFlow):
    # From a config, DDIM re-derives ε from the clipped x0 (guided-diffusion's rule, and
    # what classifier guidance does) unless told otherwise; diffusers' default keeps the
    # raw ε beside the clipped x0, which measured far worse on the ε quickstart (judge
    # accuracy 38.8 % vs 59.4 %, BUILD_NOTES). from_diffusers_scheduler keeps diffusers'.
    options.setdefault("use_clipped_model_output", True)
  if ALIASES.get(name, name) == "ddpm" and not isinstance(process, RectifiedFlow):
    chosen, trained = options.get("variance_type"), process.variance_type
    check(chosen not in LEARNED_DDPM_VARIANCES or process.learns_variance,
          f"sample.options.variance_type={chosen!r} reads a learned variance, but "
          f"diffusion.variance_type={trained!r} trains none (the model has no variance "
          f"output); valid here: fixed_small, fixed_large, fixed_small_log, fixed_large_log")
    check(not (chosen == "learned" and trained == "learned"),
          "sample.options.variance_type='learned' reads the extra channels as Σ (diffusers' "
          "meaning), but diffusion.variance_type='learned' trains them as log Σ: use "
          "'learned_log' (or leave the option unset)")
  custom = "respacing" in options or options.get("timesteps") is not None or (
      options.get("sigmas") is not None)
  return make(process, None if custom else int(sample_config.num_steps), **options)


def check_sample_config(process, sample_config) -> str:
  """Validates `config.sample` against the process, before any training starts (the
  sampler is built: its schedule is host-side and cheap); returns "flow" or "gaussian"."""
  check(sample_config.get("guidance_scale", 1.0) >= 0,
        f"sample.guidance_scale must be >= 0, got {sample_config.get('guidance_scale')}")
  check(isinstance(sample_config.num_steps, (int, np.integer)) and sample_config.num_steps >= 1,
        f"sample.num_steps must be an int >= 1, got {sample_config.num_steps!r}")
  build_sampler(process, sample_config)
  return "flow" if isinstance(process, RectifiedFlow) else "gaussian"


def run_sampler(process, model_fn, shape, key, sample_config, cond_fn=None):
  """Draws x_T ~ N(0, I) of `shape` from `split(key)[0]` and runs the sampler of
  `config.sample` with step noise from `split(key)[1]`. `cond_fn`: optional
  classifier guidance (gaussian samplers), see the module docstring."""
  sample = build_sampler(process, sample_config)
  init_key, noise_key = jax.random.split(key)
  noise = jax.random.normal(init_key, shape, jnp.float32)  # each sampler scales it
  if cond_fn is None:
    return sample(model_fn, noise, noise_key)
  return sample(model_fn, noise, noise_key, cond_fn=cond_fn)
