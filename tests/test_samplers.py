"""Sampler parity with diffusers' schedulers, full trajectories, every option.

The same deterministic "denoiser" is written once for JAX and once for torch; our
`jax.lax.scan` samplers and a hand-written loop over the diffusers scheduler start
from the same x_T and draw the same per-step noise (`normal(fold_in(key, i))`).
The model uses only + - * / (correctly rounded in both frameworks). diffusers runs on
NCHW tensors (its learned-variance split and thresholding read axis 1 as channels),
ours on NHWC; the model is elementwise, so the layouts are the same computation.

The schedules (β, ᾱ, timesteps, σ) and the per-step coefficients are computed on the
host in diffusers' dtypes and operation order, so they are bit-identical. Compiled, XLA's
CPU backend contracts a·b + c into one fused multiply-add (one rounding where torch
rounds twice) and turns a division by a broadcast scalar (ε-prediction's
x0 = (x_t - sqrt(1-ᾱ)·ε) / sqrt(ᾱ)) into a multiplication by its reciprocal; no XLA
flag we found switches either off, so compiled trajectories differ from diffusers by a
few float32 ulps per step: ≤ 1e-6 relative after 1-50 steps, ≤ 3e-6 after the
1000-step DDPM chain. Options that go through exp/log (fixed_small_log,
learned_range, Karras / exponential / Beta σ) or a quantile (thresholding) are held
to 1e-5.

The tests use the "rbg" PRNG for the per-step noise: the samplers' noise rule
`normal(fold_in(key, i))` is the same for any key type, and its graphs compile in a
third of threefry's time, which keeps this file fast. `run_sampler` is tested with the
default threefry keys.
"""

import diffusers
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from diffusers.schedulers import scheduling_ddpm, scheduling_flow_match_euler_discrete

from ldm_jax.diffusion import samplers, schedules
from ldm_jax.diffusion.flow import RectifiedFlow
from ldm_jax.diffusion.gaussian import GaussianDiffusion
from ldm_jax.errors import UserError
from tests import sampler_models
from tests.sampler_models import model_jax, model_torch, noise_key

T = 1000
SHAPE = (2, 8, 8, 3)
TOL = 1e-6  # max|ours - diffusers| / max|diffusers| over the final sample
# The 1000-step DDPM chain accumulates 1000 steps of those ulp-level differences (fused
# multiply-adds, reciprocal division; see the module docstring): measured 1.43e-6 (1.1e-6
# to 1.8e-6 across the noise draws and toy models tried), so 3e-6, not 1e-6.
TOL_FULL_CHAIN = 3e-6
TOL_TRANSCENDENTAL = 1e-5  # exp / log / pow / quantile: libm and XLA differ by ulps

DIFFUSERS_SCHEDULE = {"linear": "linear", "scaled_linear": "scaled_linear",
                      "cosine": "squaredcos_cap_v2", "sigmoid": "sigmoid"}
DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}
BETA_RANGE = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012),
              "cosine": (1e-4, 0.02), "sigmoid": (1e-4, 0.02)}


# -- the shared deterministic model: tests/sampler_models.py ----------------------
def head(x):
  """A variance head: in (-0.5, 0.5) (learned_range's v), and 0.01 + 0.01·head > 0."""
  return x / (1.0 + x * x)


def model2_jax(x, t):
  """Output and a variance head, 2C channels (NHWC)."""
  return jnp.concatenate([model_jax(x, t), head(x)], axis=-1)


def model2_torch(x, t, variance_type):
  out = head(x)
  if variance_type == "learned":  # diffusers reads the variance itself
    out = 0.01 + 0.01 * out
  return torch.cat([model_torch(x, t), out], dim=1)


def model2_jax_learned(x, t):
  return jnp.concatenate([model_jax(x, t), 0.01 + 0.01 * head(x)], axis=-1)


def recording(model_fn, times):
  """Wraps a JAX model_fn so every model time it sees is appended to `times`."""

  def record(t):
    times.append(np.asarray(t).copy())

  def wrapped(x, t):
    jax.debug.callback(record, t, ordered=True)
    return model_fn(x, t)

  return wrapped


def rel_err(ours, theirs):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def assert_parity(ours, theirs, label, tol=TOL):
  assert np.all(np.isfinite(np.asarray(theirs))), f"{label}: diffusers diverged"
  err = rel_err(ours, theirs)
  print(f"[parity] {label}: max rel err {err:.3g}")
  assert err <= tol, f"{label}: max rel err {err:.3g} > {tol:g}"


def x_init(seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32))


def step_noises(key, n):
  return sampler_models.step_noises(key, n, SHAPE)


def to_torch(x):
  """NHWC numpy / jax -> NCHW torch."""
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def to_numpy(x):
  return x.numpy().transpose(0, 2, 3, 1)


def patched_randn(monkeypatch, module, noises, state):
  """The module's `randn_tensor` returns `noises[state["step"]]` (NCHW)."""
  monkeypatch.setattr(module, "randn_tensor",
                      lambda shape, **kw: to_torch(noises[state["step"]]))


def ddpm_reference(ref, x, noises, monkeypatch, model=model_torch):
  """diffusers' DDPM loop from x, its `randn_tensor` returning `noises[i]` at step i."""
  state = {"step": 0}
  patched_randn(monkeypatch, scheduling_ddpm, noises, state)
  sample = to_torch(x)
  with torch.no_grad():
    for i, t in enumerate(ref.timesteps):
      state["step"] = i
      sample = ref.step(model(sample, t), t, sample).prev_sample
  return to_numpy(sample)


def ddim_reference(ref, x, noises, eta, use_clipped_model_output=False):
  """diffusers' DDIM loop from x, `variance_noise=noises[i]` at step i when η > 0."""
  sample = to_torch(x)
  with torch.no_grad():
    for i, t in enumerate(ref.timesteps):
      noise = to_torch(noises[i]) if eta > 0 else None
      sample = ref.step(model_torch(sample, t), t, sample, eta=eta, variance_noise=noise,
                        use_clipped_model_output=use_clipped_model_output).prev_sample
  return to_numpy(sample)


def euler_reference(ref, x, monkeypatch=None, noises=None):
  """diffusers' flow-matching Euler loop from x (stochastic: noises[i] at step i)."""
  state = {"step": 0}
  if noises is not None:
    patched_randn(monkeypatch, scheduling_flow_match_euler_discrete, noises, state)
  sample = to_torch(x)
  with torch.no_grad():
    for i, t in enumerate(ref.timesteps):
      state["step"] = i
      sample = ref.step(model_torch(sample, t), t, sample).prev_sample
  return to_numpy(sample)


def gaussian_process(schedule, prediction, zero_snr=False):
  beta_start, beta_end = BETA_RANGE[schedule]
  fields = dict(process="gaussian", beta_schedule=schedule, num_timesteps=T,
                beta_start=beta_start, beta_end=beta_end, prediction=prediction)
  if zero_snr:
    fields["rescale_zero_snr"] = True
  return GaussianDiffusion.from_config(ml_collections.ConfigDict(fields))


def scheduler_kwargs(schedule, prediction, zero_snr=False):
  beta_start, beta_end = BETA_RANGE[schedule]
  return dict(num_train_timesteps=T, beta_schedule=DIFFUSERS_SCHEDULE[schedule],
              beta_start=beta_start, beta_end=beta_end,
              prediction_type=DIFFUSERS_PREDICTION[prediction],
              rescale_betas_zero_snr=zero_snr)


# -- the β schedule ----------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("num_timesteps", [1000, 300])
def test_alphas_cumprod_match_diffusers(schedule, num_timesteps):
  beta_start, beta_end = BETA_RANGE[schedule]
  ref = diffusers.DDPMScheduler(num_train_timesteps=num_timesteps,
                                beta_schedule=DIFFUSERS_SCHEDULE[schedule],
                                beta_start=beta_start, beta_end=beta_end)
  betas = schedules.make_betas(schedule, num_timesteps, beta_start, beta_end)
  ours = schedules.alphas_cumprod(betas)
  assert betas.dtype == np.float32 and ours.dtype == np.float32
  # schedules.py mirrors torch's float32 linspace and float64-accumulated cumprod, so the
  # tables are identical; the samplers' 1e-6 parity below relies on that.
  np.testing.assert_array_equal(betas, ref.betas.numpy())
  np.testing.assert_array_equal(ours, ref.alphas_cumprod.numpy())


# -- threshold_x0 ------------------------------------------------------------------
def test_threshold_x0_matches_diffusers():
  rng = np.random.default_rng(0)
  for ratio, max_value in [(0.995, 1.0), (0.9, 3.0), (0.5, 1.5), (1.0, 10.0), (0.0, 2.0)]:
    ref = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=ratio,
                                  sample_max_value=max_value)
    x = (rng.standard_normal(SHAPE) * 2).astype(np.float32)
    theirs = to_numpy(ref._threshold_sample(to_torch(x)))  # pylint: disable=protected-access
    ours = samplers.threshold_x0(jnp.asarray(x), thresholding=True,
                                 dynamic_thresholding_ratio=ratio, sample_max_value=max_value)
    assert rel_err(ours, theirs) <= 1e-6, (ratio, max_value)
  x = jnp.asarray(rng.standard_normal(SHAPE).astype(np.float32) * 3)
  np.testing.assert_array_equal(samplers.threshold_x0(x), x)
  np.testing.assert_array_equal(samplers.threshold_x0(x, clip_sample=True, clip_sample_range=2.0),
                                jnp.clip(x, -2.0, 2.0))
  # thresholding wins over clip_sample, as in diffusers
  both = samplers.threshold_x0(x, clip_sample=True, clip_sample_range=0.1, thresholding=True,
                               sample_max_value=5.0)
  assert float(jnp.abs(both).max()) > 0.1 and float(jnp.abs(both).max()) <= 1.0
  with pytest.raises(UserError, match="dynamic_thresholding_ratio"):
    samplers.threshold_x0(x, thresholding=True, dynamic_thresholding_ratio=1.5)


# -- DDPM ----------------------------------------------------------------------------
DDPM_CASES = [
    # schedule, prediction, steps, options (diffusers' config keys + `timesteps`)
    ("linear", "epsilon", 10, {}),  # diffusers' defaults: leading, fixed_small, clipping
    ("scaled_linear", "epsilon", 10, dict(clip_sample=False)),
    ("cosine", "epsilon", 10, dict(clip_sample=False)),
    ("linear", "v", 10, dict(timestep_spacing="trailing")),
    ("linear", "x0", 10, dict(variance_type="fixed_large", timestep_spacing="linspace")),
    ("cosine", "v", 10, dict(variance_type="fixed_large", timestep_spacing="trailing",
                             clip_sample=False)),
    ("cosine", "x0", 10, dict(timestep_spacing="linspace")),
    ("scaled_linear", "x0", 10, dict(steps_offset=1, clip_sample=False)),
    ("scaled_linear", "v", 10, dict(variance_type="fixed_large")),
    ("linear", "epsilon", 7, dict(variance_type="fixed_large", timestep_spacing="trailing")),
    ("cosine", "epsilon", 1, dict(timestep_spacing="trailing")),
    ("linear", "epsilon", 1000, {}),  # the full chain
    ("linear", "epsilon", 10, dict(variance_type="fixed_small_log")),
    ("cosine", "v", 10, dict(variance_type="learned_range", clip_sample=False)),
    ("scaled_linear", "epsilon", 10, dict(variance_type="learned", timestep_spacing="trailing")),
    ("linear", "epsilon", 10, dict(thresholding=True, dynamic_thresholding_ratio=0.9,
                                   sample_max_value=2.0)),
    ("scaled_linear", "x0", 10, dict(clip_sample_range=0.5)),
    ("sigmoid", "epsilon", 10, dict(clip_sample=False)),
    ("linear", "v", None, dict(timesteps=[999, 800, 555, 300, 120, 3])),
    ("scaled_linear", "v", 10, dict(timestep_spacing="trailing", zero_snr=True)),
]


def _tol(steps, options):
  if steps == T:
    return TOL_FULL_CHAIN
  transcendental = options.get("variance_type", "").endswith(("_log", "learned_range"))
  return TOL_TRANSCENDENTAL if transcendental or options.get("thresholding") else TOL


@pytest.mark.parametrize("schedule,prediction,steps,options", DDPM_CASES)
def test_ddpm_trajectory_matches_diffusers(monkeypatch, schedule, prediction, steps, options):
  options = dict(options)
  zero_snr = options.pop("zero_snr", False)
  custom = options.get("timesteps")
  process = gaussian_process(schedule, prediction, zero_snr)
  config = {k: v for k, v in options.items() if k != "timesteps"}
  ref = diffusers.DDPMScheduler(**scheduler_kwargs(schedule, prediction, zero_snr), **config)
  ref.set_timesteps(steps, timesteps=custom)
  # identical tables, but for the sigmoid β (torch's float32 sigmoid; within 2e-7)
  np.testing.assert_allclose(process.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=5e-7)

  sampler = samplers.ddpm_sampler(process, steps, **options)
  np.testing.assert_array_equal(sampler.timesteps, ref.timesteps.numpy())
  variance_type = options.get("variance_type", "fixed_small")
  learned = variance_type.startswith("learned")
  model = {"learned": model2_jax_learned, "learned_range": model2_jax}.get(variance_type,
                                                                            model_jax)
  key, x = noise_key(7), x_init(0)
  times = []
  ours = jax.jit(sampler, static_argnums=0)(recording(model, times), x, key)
  np.testing.assert_array_equal(np.stack(times)[:, 0], ref.timesteps.numpy())  # model time
  n = len(ref.timesteps)
  theirs = ddpm_reference(
      ref, x, step_noises(key, n), monkeypatch,
      (lambda s, t: model2_torch(s, t, variance_type)) if learned else model_torch)
  assert_parity(ours, theirs, f"ddpm {schedule}/{prediction}/n={steps}/{options}"
                              f"{'/zero_snr' if zero_snr else ''}", _tol(steps, options))


def test_ddpm_fixed_large_log(monkeypatch):
  """diffusers' fixed_large_log takes sqrt(log β_t) < 0 and samples NaN; ours is
  std = exp(½·log β_t), i.e. fixed_large up to exp/log rounding."""
  process = gaussian_process("linear", "epsilon")
  key, x = noise_key(1), x_init(1)
  broken = diffusers.DDPMScheduler(**scheduler_kwargs("linear", "epsilon"),
                                   variance_type="fixed_large_log")
  broken.set_timesteps(10)
  with np.errstate(invalid="ignore"):
    assert np.isnan(ddpm_reference(broken, x, step_noises(key, 10), monkeypatch)).all()
  ref = diffusers.DDPMScheduler(**scheduler_kwargs("linear", "epsilon"),
                                variance_type="fixed_large")
  ref.set_timesteps(10)
  ours = samplers.ddpm_sampler(process, 10, variance_type="fixed_large_log")(model_jax, x, key)
  assert_parity(ours, ddpm_reference(ref, x, step_noises(key, 10), monkeypatch),
                "ddpm fixed_large_log vs diffusers fixed_large", TOL_TRANSCENDENTAL)


def test_ddpm_learned_log_and_default_from_process():
  """learned_log (guided-diffusion's LEARNED: the extra channels are log Σ) equals
  diffusers' learned (the channels are Σ) fed exp of the same values; the default
  variance_type follows the process's."""
  process = gaussian_process("linear", "epsilon")
  key, x = noise_key(2), x_init(2)
  log_model = lambda x, t: jnp.concatenate([model_jax(x, t), -4.0 + head(x)], -1)
  var_model = lambda x, t: jnp.concatenate([model_jax(x, t), jnp.exp(-4.0 + head(x))], -1)
  ours = samplers.ddpm_sampler(process, 5, variance_type="learned_log")(log_model, x, key)
  learned = samplers.ddpm_sampler(process, 5, variance_type="learned")(var_model, x, key)
  assert rel_err(ours, learned) <= 1e-5
  for trained, expected in [("learned", "learned_log"), ("learned_range", "learned_range")]:
    learns = GaussianDiffusion(betas=process.betas, variance_type=trained)
    with pytest.raises(UserError, match=f"variance_type='{expected}'.*6 channels"):
      samplers.ddpm_sampler(learns, 5)(model_jax, x, key)  # only 3 channels


# -- DDIM ----------------------------------------------------------------------------
DDIM_CASES = [
    # schedule, prediction, steps, options (config keys + the step's eta,
    # use_clipped_model_output)
    ("linear", "epsilon", 10, {}),
    ("scaled_linear", "epsilon", 10, dict(set_alpha_to_one=False, steps_offset=1,
                                          clip_sample=False)),
    ("cosine", "v", 10, dict(timestep_spacing="trailing", clip_sample=False)),
    ("linear", "x0", 10, dict(timestep_spacing="linspace")),
    ("cosine", "epsilon", 7, dict(timestep_spacing="trailing")),
    ("linear", "epsilon", 10, dict(eta=0.5)),
    ("cosine", "v", 10, dict(eta=1.0, set_alpha_to_one=False, timestep_spacing="trailing",
                             clip_sample=False)),
    ("scaled_linear", "x0", 10, dict(eta=1.0, timestep_spacing="linspace", clip_sample=False)),
    ("scaled_linear", "v", 50, dict(eta=0.5, set_alpha_to_one=False, steps_offset=1)),
    ("linear", "epsilon", 1, dict(eta=1.0, set_alpha_to_one=False, steps_offset=1,
                                  clip_sample=False)),
    ("linear", "epsilon", 10, dict(use_clipped_model_output=True, clip_sample_range=0.8)),
    ("linear", "x0", 10, dict(thresholding=True, dynamic_thresholding_ratio=0.8,
                              sample_max_value=1.5, eta=0.3)),
    ("scaled_linear", "v", 10, dict(timestep_spacing="trailing", clip_sample=False,
                                    zero_snr=True)),
]
DDIM_STEP_ARGS = ("eta", "use_clipped_model_output")


@pytest.mark.parametrize("schedule,prediction,steps,options", DDIM_CASES)
def test_ddim_trajectory_matches_diffusers(schedule, prediction, steps, options):
  options = dict(options)
  zero_snr = options.pop("zero_snr", False)
  process = gaussian_process(schedule, prediction, zero_snr)
  config = {k: v for k, v in options.items() if k not in DDIM_STEP_ARGS}
  ref = diffusers.DDIMScheduler(**scheduler_kwargs(schedule, prediction, zero_snr), **config)
  ref.set_timesteps(steps)
  sampler = samplers.ddim_sampler(process, steps, **options)
  np.testing.assert_array_equal(sampler.timesteps, ref.timesteps.numpy())
  eta = options.get("eta", 0.0)
  key, x = noise_key(3), x_init(1)
  ours = jax.jit(sampler, static_argnums=0)(model_jax, x, key)
  noises = step_noises(key, steps) if eta > 0 else None
  theirs = ddim_reference(ref, x, noises, eta, options.get("use_clipped_model_output", False))
  assert_parity(ours, theirs, f"ddim {schedule}/{prediction}/n={steps}/{options}"
                              f"{'/zero_snr' if zero_snr else ''}",
                TOL_TRANSCENDENTAL if options.get("thresholding") else TOL)


# -- flow matching Euler -------------------------------------------------------------
def _flux_mu(seq_len, base_seq=256, max_seq=4096, base_shift=0.5, max_shift=1.15):
  """The Flux / SD3 pipelines' `calculate_shift`, written out for the test."""
  m = (max_shift - base_shift) / (max_seq - base_seq)
  return seq_len * m + (base_shift - m * base_seq)


FLOW_CASES = [
    # shift, steps, options (config keys + set_timesteps' mu / sigmas / timesteps)
    (1.0, 1, {}),
    (3.0, 5, {}),
    (3.0, 28, {}),
    (1.0, 10, dict(use_dynamic_shifting=True, mu=0.8)),
    (1.0, 10, dict(use_dynamic_shifting=True, time_shift_type="linear", mu=1.5)),
    (1.0, 12, dict(use_dynamic_shifting=True, image_seq_len=1024, base_shift=0.6,
                   max_shift=1.2)),
    (3.0, 10, dict(shift_terminal=0.1)),
    (3.0, 10, dict(use_karras_sigmas=True)),
    (3.0, 10, dict(use_exponential_sigmas=True)),
    (2.0, 10, dict(use_beta_sigmas=True)),
    (1.0, 10, dict(invert_sigmas=True)),
    (3.0, 10, dict(stochastic_sampling=True)),
    (3.0, None, dict(sigmas=[1.0, 0.8, 0.5, 0.2])),
    (3.0, None, dict(timesteps=[1000.0, 750.0, 500.0, 250.0])),
    (2.0, 3, dict(sigmas=[1.0, 0.6, 0.3], timesteps=[990.0, 600.0, 310.0])),
]
FLOW_SET_TIMESTEPS = ("mu", "sigmas", "timesteps", "image_seq_len")


@pytest.mark.parametrize("shift,steps,options", FLOW_CASES)
def test_flow_euler_trajectory_matches_diffusers(monkeypatch, shift, steps, options):
  process = RectifiedFlow(shift=shift, num_train_timesteps=T)
  config = {k: v for k, v in options.items() if k not in FLOW_SET_TIMESTEPS}
  ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift, **config)
  mu = options.get("mu")
  if "image_seq_len" in options:
    mu = _flux_mu(options["image_seq_len"], base_shift=options["base_shift"],
                  max_shift=options["max_shift"])
  ref.set_timesteps(steps, sigmas=options.get("sigmas"), mu=mu,
                    timesteps=options.get("timesteps"))
  sampler = samplers.flow_euler_sampler(process, steps, **options)
  # Same float64-then-float32 recipe as diffusers, so the grids are identical.
  np.testing.assert_array_equal(sampler.sigmas, ref.sigmas.numpy())
  np.testing.assert_array_equal(sampler.timesteps, ref.timesteps.numpy())
  key, x = noise_key(4), x_init(2)
  times = []
  ours = jax.jit(sampler, static_argnums=0)(recording(model_jax, times), x, key)
  np.testing.assert_array_equal(np.stack(times)[:, 0], ref.timesteps.numpy())
  n = len(ref.timesteps)
  noises = step_noises(key, n) if options.get("stochastic_sampling") else None
  assert_parity(ours, euler_reference(ref, x, monkeypatch, noises),
                f"flow euler shift={shift}/n={steps}/{options}")


def test_flow_sigmas_match_diffusers_on_more_grids():
  for shift in (0.5, 1.0, 2.5, 3.0, 7.0):
    for steps in (2, 50, 1000):
      ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
      ref.set_timesteps(steps)
      sigmas = samplers.flow_sigmas(steps, shift, T)
      np.testing.assert_array_equal(sigmas, ref.sigmas.numpy())
      assert np.all(np.diff(sigmas) < 0)
  ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=300, shift=3.0)
  ref.set_timesteps(20)
  np.testing.assert_array_equal(samplers.flow_sigmas(20, 3.0, 300), ref.sigmas.numpy())


def test_formulas_are_diffusers_own(monkeypatch):
  """Op by op (no XLA fusion, so no fused multiply-adds), the trajectories without a
  division by ᾱ are bit-identical to diffusers': same expressions, same rounding order."""
  x = x_init(4)
  key = noise_key(5)
  with jax.disable_jit():
    noises = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, i), SHAPE))
                       for i in range(10)])
    process = gaussian_process("cosine", "x0")
    ref = diffusers.DDPMScheduler(variance_type="fixed_large", timestep_spacing="trailing",
                                  **scheduler_kwargs("cosine", "x0"))
    ref.set_timesteps(10)
    ours = samplers.ddpm_sampler(process, 10, variance_type="fixed_large",
                                 timestep_spacing="trailing")(model_jax, x, key)
    assert rel_err(ours, ddpm_reference(ref, x, noises, monkeypatch)) == 0.0

    process = gaussian_process("scaled_linear", "v")
    ref = diffusers.DDIMScheduler(set_alpha_to_one=False, steps_offset=1, clip_sample=False,
                                  **scheduler_kwargs("scaled_linear", "v"))
    ref.set_timesteps(10)
    ours = samplers.ddim_sampler(process, 10, set_alpha_to_one=False, steps_offset=1,
                                 clip_sample=False, eta=1.0)(model_jax, x, key)
    assert rel_err(ours, ddim_reference(ref, x, noises, 1.0)) == 0.0

    ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=3.0)
    ref.set_timesteps(10)
    ours = samplers.flow_euler_sampler(RectifiedFlow(shift=3.0), 10)(model_jax, x, key)
    assert rel_err(ours, euler_reference(ref, x)) == 0.0


# -- classifier guidance (cond_fn) ---------------------------------------------------
def test_cond_fn_ddpm():
  process = gaussian_process("linear", "epsilon")
  key, x = noise_key(6), x_init(3)
  sampler = samplers.ddpm_sampler(process, 10, clip_sample=False)
  plain = sampler(model_jax, x, key)
  np.testing.assert_array_equal(sampler(model_jax, x, key, cond_fn=lambda x, t: 0.0 * x), plain)
  # One step from t = 500 to the clean image (fixed_large: Σ = β = 1 - ᾱ_500): a constant
  # g moves the mean, hence the sample, by exactly Σ·g.
  one = samplers.ddpm_sampler(process, None, timesteps=[500], variance_type="fixed_large",
                              clip_sample=False)
  g = 0.37
  seen = []
  guided = one(model_jax, x, key,
               cond_fn=recording(lambda x, t: jnp.full_like(x, g), seen))
  sigma = 1.0 - float(process.alphas_cumprod[500])
  np.testing.assert_allclose(np.asarray(guided - one(model_jax, x, key)), sigma * g, rtol=1e-5)
  np.testing.assert_array_equal(seen[0], [500.0, 500.0])  # cond_fn gets the model time


def test_cond_fn_ddim():
  process = gaussian_process("scaled_linear", "epsilon")
  key, x = noise_key(6), x_init(3)
  sampler = samplers.ddim_sampler(process, 10, clip_sample=False, eta=0.5)
  plain = sampler(model_jax, x, key)
  assert rel_err(sampler(model_jax, x, key, cond_fn=lambda x, t: 0.0 * x), plain) <= 1e-6
  # One step t = 999 -> clean: ε̂ = ε - sqrt(1-ᾱ)·g, x0 = (x - sqrt(1-ᾱ)·ε̂)/sqrt(ᾱ), so the
  # result moves by (1-ᾱ)/sqrt(ᾱ)·g (guided-diffusion's condition_score).
  one = samplers.ddim_sampler(process, 1, timestep_spacing="trailing", clip_sample=False)
  g = 0.01
  guided = one(model_jax, x, key, cond_fn=lambda x, t: jnp.full_like(x, g))
  abar = float(process.alphas_cumprod[999])
  np.testing.assert_allclose(np.asarray(guided - one(model_jax, x, key)),
                             (1 - abar) / np.sqrt(abar) * g, atol=2e-5)


# -- the run_sampler dispatcher ------------------------------------------------------
def _sample_config(sampler="ddpm", num_steps=10, respacing="", **options):
  return ml_collections.ConfigDict(dict(sampler=sampler, num_steps=num_steps,
                                        guidance_scale=1.0, respacing=respacing,
                                        options=options))


RUN_SAMPLER_CASES = {
    "ddpm": (lambda: gaussian_process("cosine", "v"),
             dict(variance_type="fixed_large", timestep_spacing="trailing"),
             lambda: diffusers.DDPMScheduler(variance_type="fixed_large",
                                             timestep_spacing="trailing",
                                             **scheduler_kwargs("cosine", "v"))),
    "ddim": (lambda: gaussian_process("linear", "epsilon"),
             dict(set_alpha_to_one=False, steps_offset=1, eta=0.5, clip_sample=False),
             lambda: diffusers.DDIMScheduler(set_alpha_to_one=False, steps_offset=1,
                                             clip_sample=False,
                                             **scheduler_kwargs("linear", "epsilon"))),
    "euler": (lambda: RectifiedFlow(shift=3.0, num_train_timesteps=T),
              dict(use_karras_sigmas=True),
              lambda: diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=3.0,
                                                                use_karras_sigmas=True)),
}


@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler"])
def test_run_sampler(monkeypatch, name):
  make_process, options, make_ref = RUN_SAMPLER_CASES[name]
  process, ref = make_process(), make_ref()
  config = _sample_config(name, 5, **options)
  assert samplers.check_sample_config(process, config) in ("gaussian", "flow")
  sample = jax.jit(lambda key: samplers.run_sampler(process, model_jax, SHAPE, key, config))
  key = jax.random.PRNGKey(11)
  first = np.asarray(sample(key))
  np.testing.assert_array_equal(first, np.asarray(sample(key)))
  assert first.shape == SHAPE and first.dtype == np.float32
  assert np.abs(first - np.asarray(sample(jax.random.PRNGKey(12)))).max() > 1e-2
  # The config is wired through: the same trajectory as diffusers from
  # x_T = normal(split(key)[0]) with step noises normal(fold_in(split(key)[1], i)).
  init_key, step_key = jax.random.split(key)
  x = np.asarray(jax.random.normal(init_key, SHAPE, jnp.float32))
  ref.set_timesteps(config.num_steps)
  if name == "ddpm":
    theirs = ddpm_reference(ref, x, step_noises(step_key, 5), monkeypatch)
  elif name == "ddim":
    theirs = ddim_reference(ref, x, step_noises(step_key, 5), 0.5)
  else:
    theirs = euler_reference(ref, x)
  assert_parity(first, theirs, f"run_sampler {name}", TOL_TRANSCENDENTAL)


@pytest.mark.parametrize("name,options", [
    ("euler", dict(use_karras_sigmas=True, timestep_spacing="trailing")),
    ("heun", dict(timestep_spacing="trailing")),
    ("dpm_solver", dict(solver_order=3, algorithm_type="sde-dpmsolver++")),
    ("dpmpp", dict(use_karras_sigmas=True)),
])
def test_run_sampler_reaches_sigma_samplers(name, options):
  sigma_samplers = pytest.importorskip("ldm_jax.diffusion.sigma_samplers")
  process = gaussian_process("scaled_linear", "epsilon")
  config = _sample_config(name, 4, **options)
  key = jax.random.PRNGKey(3)
  ours = samplers.run_sampler(process, model_jax, SHAPE, key, config)
  init_key, step_key = jax.random.split(key)
  make = getattr(sigma_samplers, f"{samplers.ALIASES.get(name, name)}_sampler")
  direct = make(process, 4, **options)(model_jax, jax.random.normal(init_key, SHAPE), step_key)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(direct))


def test_run_sampler_respacing_and_custom_timesteps():
  process = gaussian_process("linear", "epsilon")
  key = noise_key(0)
  out = samplers.run_sampler(process, model_jax, SHAPE, key,
                             _sample_config("ddim", respacing="ddim25"))
  # From a config DDIM re-derives ε from the clipped x0 unless told otherwise.
  direct = samplers.ddim_sampler(process, None, respacing="ddim25",
                                 use_clipped_model_output=True)
  np.testing.assert_array_equal(direct.timesteps, np.arange(960, -1, -40))
  init_key, step_key = jax.random.split(key)
  np.testing.assert_array_equal(
      np.asarray(out), np.asarray(direct(model_jax, jax.random.normal(init_key, SHAPE), step_key)))
  raw = samplers.ddim_sampler(process, None, respacing="ddim25")  # diffusers' default
  assert np.abs(np.asarray(raw(model_jax, jax.random.normal(init_key, SHAPE), step_key))
                - np.asarray(out)).max() > 1e-3
  explicit = samplers.run_sampler(process, model_jax, SHAPE, key, _sample_config(
      "ddim", respacing="ddim25", use_clipped_model_output=False))
  np.testing.assert_array_equal(np.asarray(explicit), np.asarray(raw(
      model_jax, jax.random.normal(init_key, SHAPE), step_key)))
  # custom timesteps from the config (a tuple on the command line) override num_steps
  config = _sample_config("ddpm", 10, timesteps=(900, 500, 100))
  assert samplers.build_sampler(process, config).timesteps.tolist() == [900, 500, 100]


def test_sample_config_errors():
  gauss, flow = gaussian_process("linear", "epsilon"), RectifiedFlow()
  cases = [
      (gauss, _sample_config("euler_a"), "sample.sampler='euler_a'.*valid"),
      (flow, _sample_config("ddim"),
       r"sample.sampler='ddim' does not apply to a flow.*\['euler'\]"),
      (flow, _sample_config("heun"), "does not apply to a flow"),
      (gauss, _sample_config("ddpm", eta=0.5), r"unknown option\(s\) \['eta'\] for the ddpm"),
      (gauss, _sample_config("ddim", shift=3.0), r"\['shift'\] for the ddim"),
      (gauss, _sample_config("ddpm", variance_type="big"), "variance_type='big'.*valid"),
      (gauss, _sample_config("ddim", timestep_spacing="karras"), "timestep_spacing='karras'"),
      (gauss, _sample_config("ddim", eta=-1.0), "eta=-1.0 must be >= 0"),
      (gauss, _sample_config("ddpm", 1001),
       r"num_inference_steps=1001 must be an int in \[1, 1000\]"),
      (gauss, _sample_config("ddim", steps_offset=5, timestep_spacing="leading", num_steps=1),
       None),  # valid
      (gauss, _sample_config("ddim", respacing="ddim1001"), "bad respacing 'ddim1001'"),
      (gauss, _sample_config("ddim", respacing="ddim25", timestep_spacing="trailing"),
       "replaces"),
      (gauss, _sample_config("ddpm", timesteps=(5, 900)), "strictly descending"),
      (gauss, _sample_config("ddpm", timesteps=(1000, 5)), r"in \[0, 999\]"),
      (flow, _sample_config("euler", use_karras_sigmas=True, use_beta_sigmas=True),
       "only one of"),
      (flow, _sample_config("euler", use_dynamic_shifting=True), "needs exactly one of mu"),
      (flow, _sample_config("euler", mu=0.5), "only apply with use_dynamic_shifting"),
      (flow, _sample_config("euler", time_shift_type="cubic"), "time_shift_type='cubic'"),
      (flow, _sample_config("euler", clip_sample=False), r"\['clip_sample'\] for the flow_euler"),
      (flow, _sample_config("euler", 0), "num_steps must be an int >= 1"),
  ]
  for process, config, message in cases:
    if message is None:
      samplers.check_sample_config(process, config)
      continue
    with pytest.raises(UserError, match=message):
      samplers.check_sample_config(process, config)
  legacy = _sample_config("ddim")
  legacy.eta = 0.5
  with pytest.raises(UserError, match="sample.eta=0.5 is no longer read.*sample.options.eta"):
    samplers.check_sample_config(gauss, legacy)
  legacy.eta = 0.0  # the old default is a no-op
  samplers.check_sample_config(gauss, legacy)
  with pytest.raises(UserError, match="classifier guidance"):
    samplers.flow_euler_sampler(flow, 3)(model_jax, x_init(), noise_key(0),
                                         cond_fn=lambda x, t: x)


def test_quickstart_config_reaches_every_option():
  """Every option of every sampler is a (typed) field of config.sample.options, so
  `--config.sample.options.NAME=VALUE` reaches it."""
  from configs import quickstart  # pylint: disable=import-outside-toplevel
  options = quickstart.get_config().sample.options
  tables = [samplers.DDPM_OPTIONS, samplers.DDIM_OPTIONS, samplers.FLOW_EULER_OPTIONS]
  try:
    from ldm_jax.diffusion import sigma_samplers  # pylint: disable=import-outside-toplevel
    tables += [sigma_samplers.EULER_OPTIONS, sigma_samplers.HEUN_OPTIONS,
               sigma_samplers.DPM_OPTIONS]
  except ImportError:
    pass
  wanted = set().union(*tables) - {"respacing"}  # respacing is sample.respacing
  assert wanted <= set(options.keys()), sorted(wanted - set(options.keys()))
  assert all(v is None for v in options.values())  # None: the sampler's own default


# -- guided-diffusion respacing ------------------------------------------------------
def _space_timesteps_reference(num_timesteps, section_counts):
  """guided-diffusion's `respace.space_timesteps` (openai/guided-diffusion), verbatim
  logic: the fractional index is accumulated (`cur_idx += frac_stride`) and rounded with
  Python's round-half-to-even."""
  if section_counts.startswith("ddim"):
    desired_count = int(section_counts[len("ddim"):])
    for i in range(1, num_timesteps):
      if len(range(0, num_timesteps, i)) == desired_count:
        return set(range(0, num_timesteps, i))
    raise ValueError("no stride")
  section_counts = [int(x) for x in section_counts.split(",")]
  size_per = num_timesteps // len(section_counts)
  extra = num_timesteps % len(section_counts)
  start_idx = 0
  all_steps = []
  for i, section_count in enumerate(section_counts):
    size = size_per + (1 if i < extra else 0)
    if size < section_count:
      raise ValueError("section too small")
    frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
    cur_idx = 0.0
    for _ in range(section_count):
      all_steps.append(start_idx + round(cur_idx))
      cur_idx += frac_stride
    start_idx += size
  return set(all_steps)


def test_respaced_timesteps_hand_derived():
  # "ddim25", T=1000: the smallest stride giving exactly 25 steps is 40.
  np.testing.assert_array_equal(samplers.respaced_timesteps(1000, "ddim25"),
                                np.arange(0, 1000, 40))
  np.testing.assert_array_equal(samplers.respaced_timesteps(1000, "ddim50"),
                                np.arange(0, 1000, 20))
  # "10,10,5", T=300: three sections of 100. 10 steps at stride 99/9 = 11; then 5 steps
  # at stride 99/4 = 24.75 -> round(0, 24.75, 49.5, 74.25, 99) = 0, 25, 50, 74, 99.
  np.testing.assert_array_equal(
      samplers.respaced_timesteps(300, "10,10,5"),
      np.concatenate([np.arange(0, 100, 11), 100 + np.arange(0, 100, 11),
                      200 + np.array([0, 25, 50, 74, 99])]))
  # "250", T=1000: stride 999/249 = 4 + 1/83, so step k is 4k + round(k/83) (no ties:
  # k/83 is never a half-integer): +0 for k<=41, +1 up to 124, +2 up to 207, +3 after.
  k = np.arange(250)
  expected = 4 * k + np.select([k <= 41, k <= 124, k <= 207], [0, 1, 2], 3)
  np.testing.assert_array_equal(samplers.respaced_timesteps(1000, "250"), expected)
  assert expected[-1] == 999
  # Uneven sections: T=10, "3,2" -> sections of 5: stride 2 -> 0,2,4; stride 4 -> 5,9.
  np.testing.assert_array_equal(samplers.respaced_timesteps(10, "3,2"), [0, 2, 4, 5, 9])
  # T=11, "2,2": sections of 6 and 5 (the extra step goes first): 0,5 and 6,10.
  np.testing.assert_array_equal(samplers.respaced_timesteps(11, "2,2"), [0, 5, 6, 10])
  # A count of 1 takes the start of its section.
  np.testing.assert_array_equal(samplers.respaced_timesteps(300, "1,1,1"), [0, 100, 200])


def test_respaced_timesteps_ties_round_like_guided_diffusion():
  # T=50, "25": stride 49/24; 12 strides is 24.5 exactly on paper, but the accumulated
  # float sum lands just above, so guided-diffusion takes 25 (round(12 * stride) = 24).
  assert 25 in samplers.respaced_timesteps(50, "25")
  assert 24 not in samplers.respaced_timesteps(50, "25")
  for num_timesteps in (50, 100, 300, 1000):
    for counts in [str(c) for c in range(1, num_timesteps + 1, 7)] + [
        "ddim10", "ddim25", "10,10,5", "3,7,11,2", "1,50"]:
      try:
        expected = sorted(_space_timesteps_reference(num_timesteps, counts))
      except ValueError:
        continue
      np.testing.assert_array_equal(samplers.respaced_timesteps(num_timesteps, counts),
                                    expected, err_msg=f"T={num_timesteps} {counts!r}")


def test_respaced_timesteps_errors():
  with pytest.raises(ValueError):
    samplers.respaced_timesteps(1000, "ddim3000")
  with pytest.raises(ValueError):  # UserError is a ValueError
    samplers.respaced_timesteps(30, "20,20")


def test_gaussian_timesteps_respace():
  ts, prev = samplers.gaussian_timesteps(300, "10,10,5", "respace")
  ascending = samplers.respaced_timesteps(300, "10,10,5")
  np.testing.assert_array_equal(ts, ascending[::-1])
  np.testing.assert_array_equal(prev, np.append(ascending[::-1][1:], -1))
  ts, prev = samplers.gaussian_timesteps(1000, "ddim25", "respace", prev_rule="stride")
  np.testing.assert_array_equal(ts, np.arange(960, -1, -40))
  np.testing.assert_array_equal(prev, np.arange(920, -41, -40))
  assert ts.dtype == np.int32 and prev.dtype == np.int32
  with pytest.raises(UserError):
    samplers.gaussian_timesteps(1000, 1001, "leading")
  with pytest.raises(UserError):
    samplers.gaussian_timesteps(1000, 10, "karras")


def test_config_path_checks_learned_ddpm_variances_before_training():
  """A learned DDPM variance needs a process that trains one, and 'learned' (Σ, the
  diffusers meaning) must not read a log-Σ head: both refused when the sampler is built,
  i.e. by check_sample_config before training starts."""
  fixed = gaussian_process("linear", "epsilon")
  with pytest.raises(UserError, match="trains none"):
    samplers.check_sample_config(fixed, _sample_config("ddpm", variance_type="learned_range"))
  log_head = GaussianDiffusion(betas=fixed.betas, variance_type="learned")
  with pytest.raises(UserError, match="use 'learned_log'"):
    samplers.check_sample_config(log_head, _sample_config("ddpm", variance_type="learned"))
  samplers.check_sample_config(log_head, _sample_config("ddpm"))  # default: learned_log
