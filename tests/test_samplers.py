"""Sampler parity with diffusers' schedulers, full trajectories.

The same deterministic "denoiser" is written once for JAX and once for torch; our
`jax.lax.scan` samplers and a hand-written loop over the diffusers scheduler start
from the same x_T and draw the same per-step noise (`normal(fold_in(key, i))`).
The model uses only + - * / (correctly rounded in both frameworks; no division by a
broadcast scalar, see below).

The schedules (β, ᾱ, timesteps, σ) and DDIM's per-step coefficients are bit-identical to
diffusers'. The sampler update formulas are the same expressions in the same order too:
run op by op (`jax.disable_jit`) the x0- and v-prediction and flow trajectories are
bit-identical (`test_formulas_are_diffusers_own`). Compiled, XLA's CPU backend contracts
a·b + c into one fused multiply-add (one rounding where torch rounds twice) and turns a
division by a broadcast scalar (ε-prediction's x0 = (x_t - sqrt(1-ᾱ)·ε) / sqrt(ᾱ)) into a
multiplication by its reciprocal; no XLA flag we found switches either off, so compiled
trajectories differ from diffusers by a few float32 ulps per step: measured ≤ 5.3e-7
relative after 1-50 steps, 1.4e-6 after the 1000-step DDPM chain.

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
from diffusers.schedulers import scheduling_ddpm

from ldm_jax.diffusion import samplers, schedules
from ldm_jax.diffusion.flow import RectifiedFlow
from ldm_jax.diffusion.gaussian import GaussianDiffusion
from ldm_jax.errors import UserError

T = 1000
SHAPE = (2, 8, 8, 3)
TOL = 1e-6  # max|ours - diffusers| / max|diffusers| over the final sample
# The 1000-step DDPM chain accumulates 1000 steps of those ulp-level differences (fused
# multiply-adds, reciprocal division; see the module docstring): measured 1.43e-6 (1.1e-6
# to 1.8e-6 across the noise draws and toy models tried), so 3e-6, not 1e-6.
TOL_FULL_CHAIN = 3e-6

DIFFUSERS_SCHEDULE = {"linear": "linear", "scaled_linear": "scaled_linear",
                      "cosine": "squaredcos_cap_v2"}
DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}
BETA_RANGE = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012),
              "cosine": (1e-4, 0.02)}  # the cosine schedule ignores the range


# -- the shared deterministic model ---------------------------------------------
def model_jax(x, t):
  """Nonlinear in x and t; t is the (B,) float32 model time."""
  s = (t * 0.001).reshape((-1,) + (1,) * (x.ndim - 1))
  return 0.5 * x * (1.0 - s * s) + 0.3 * x / (1.0 + x * x) + 0.05 * s


def model_torch(x, t):
  """`model_jax` in torch; t is the scheduler's 0-d timestep tensor (int or float)."""
  s = t * 0.001
  return 0.5 * x * (1.0 - s * s) + 0.3 * x / (1.0 + x * x) + 0.05 * s


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


def noise_key(seed):
  return jax.random.key(seed, impl="rbg")


@jax.jit
def _step_noises(key, steps):
  # lax.map, not vmap: a batched RngBitGenerator ("rbg") does not reproduce per-key draws.
  return jax.lax.map(lambda i: jax.random.normal(jax.random.fold_in(key, i), SHAPE, jnp.float32),
                     steps)


def step_noises(key, n):
  """(n, *SHAPE): the noise our samplers draw at step i, `normal(fold_in(key, i))`."""
  return np.asarray(_step_noises(key, jnp.arange(n)))


def ddpm_reference(ref, x, noises, monkeypatch):
  """diffusers' DDPM loop from x, its `randn_tensor` returning `noises[i]` at step i."""
  state = {"step": 0}
  monkeypatch.setattr(scheduling_ddpm, "randn_tensor",
                      lambda shape, **kw: torch.from_numpy(noises[state["step"]].copy()))
  sample = torch.from_numpy(np.array(x))
  with torch.no_grad():
    for i, t in enumerate(ref.timesteps):
      state["step"] = i
      sample = ref.step(model_torch(sample, t), t, sample).prev_sample
  return sample.numpy()


def ddim_reference(ref, x, noises, eta):
  """diffusers' DDIM loop from x, `variance_noise=noises[i]` at step i when η > 0."""
  sample = torch.from_numpy(np.array(x))
  with torch.no_grad():
    for i, t in enumerate(ref.timesteps):
      noise = torch.from_numpy(noises[i].copy()) if eta > 0 else None
      sample = ref.step(model_torch(sample, t), t, sample, eta=eta,
                        variance_noise=noise).prev_sample
  return sample.numpy()


def euler_reference(ref, x):
  """diffusers' flow-matching Euler loop from x."""
  sample = torch.from_numpy(np.array(x))
  with torch.no_grad():
    for t in ref.timesteps:
      sample = ref.step(model_torch(sample, t), t, sample).prev_sample
  return sample.numpy()


def gaussian_process(schedule, prediction):
  beta_start, beta_end = BETA_RANGE[schedule]
  return GaussianDiffusion.from_config(ml_collections.ConfigDict(dict(
      process="gaussian", beta_schedule=schedule, num_timesteps=T, beta_start=beta_start,
      beta_end=beta_end, prediction=prediction)))


def scheduler_kwargs(schedule, prediction, clip):
  beta_start, beta_end = BETA_RANGE[schedule]
  return dict(num_train_timesteps=T, beta_schedule=DIFFUSERS_SCHEDULE[schedule],
              beta_start=beta_start, beta_end=beta_end,
              prediction_type=DIFFUSERS_PREDICTION[prediction], clip_sample=clip)


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
  err = float(np.max(np.abs(ours - ref.alphas_cumprod.numpy()) / ref.alphas_cumprod.numpy()))
  print(f"[parity] alphas_cumprod {schedule} T={num_timesteps}: max rel err {err:.3g}")
  assert err <= 1e-6
  # schedules.py mirrors torch's float32 linspace and float64-accumulated cumprod, so the
  # tables are in fact identical; the samplers' 1e-6 parity below relies on that.
  np.testing.assert_array_equal(betas, ref.betas.numpy())
  np.testing.assert_array_equal(ours, ref.alphas_cumprod.numpy())


# -- DDPM ----------------------------------------------------------------------------
DDPM_CASES = [
    # schedule, prediction, variance, clip, spacing, steps, steps_offset
    ("linear", "epsilon", "fixed_small", False, "leading", 10, 0),
    ("scaled_linear", "epsilon", "fixed_small", False, "leading", 10, 0),
    ("cosine", "epsilon", "fixed_small", False, "leading", 10, 0),
    ("linear", "v", "fixed_small", True, "trailing", 10, 0),
    ("linear", "x0", "fixed_large", True, "linspace", 10, 0),
    ("cosine", "v", "fixed_large", False, "trailing", 10, 0),
    ("cosine", "x0", "fixed_small", True, "linspace", 10, 0),
    ("scaled_linear", "x0", "fixed_small", False, "leading", 10, 1),
    ("scaled_linear", "v", "fixed_large", True, "leading", 10, 0),
    ("linear", "epsilon", "fixed_large", True, "trailing", 7, 0),
    ("cosine", "epsilon", "fixed_small", True, "trailing", 1, 0),
    ("linear", "epsilon", "fixed_small", True, "leading", 1000, 0),  # the full chain
]


@pytest.mark.parametrize("schedule,prediction,variance,clip,spacing,steps,offset", DDPM_CASES)
def test_ddpm_trajectory_matches_diffusers(monkeypatch, schedule, prediction, variance, clip,
                                           spacing, steps, offset):
  process = gaussian_process(schedule, prediction)
  ref = diffusers.DDPMScheduler(variance_type=variance, timestep_spacing=spacing,
                                steps_offset=offset,
                                **scheduler_kwargs(schedule, prediction, clip))
  ref.set_timesteps(steps)

  timesteps, prev = samplers.gaussian_timesteps(T, steps, spacing, offset, prev_rule="list")
  np.testing.assert_array_equal(timesteps, ref.timesteps.numpy())
  np.testing.assert_array_equal(prev, [int(ref.previous_timestep(t)) for t in ref.timesteps])

  key = noise_key(7)
  x = x_init(0)
  ours = samplers.ddpm_sample(model_jax, process, x, key, timesteps, prev, variance=variance,
                              clip_x0=1.0 if clip else None)
  theirs = ddpm_reference(ref, x, step_noises(key, steps), monkeypatch)
  assert_parity(ours, theirs,
                f"ddpm {schedule}/{prediction}/{variance}/clip={clip}/{spacing}/n={steps}"
                f"/offset={offset}", TOL_FULL_CHAIN if steps == T else TOL)


# -- DDIM ----------------------------------------------------------------------------
DDIM_CASES = [
    # schedule, prediction, eta, set_alpha_to_one, steps_offset, spacing, clip, steps
    ("linear", "epsilon", 0.0, True, 0, "leading", False, 10),
    ("scaled_linear", "epsilon", 0.0, False, 1, "leading", False, 10),
    ("cosine", "v", 0.0, True, 0, "trailing", False, 10),
    ("linear", "x0", 0.0, False, 0, "linspace", True, 10),
    ("cosine", "epsilon", 0.0, True, 0, "trailing", True, 7),
    ("linear", "epsilon", 0.5, True, 0, "leading", True, 10),
    ("cosine", "v", 1.0, False, 0, "trailing", False, 10),
    ("scaled_linear", "x0", 1.0, True, 0, "linspace", False, 10),
    ("scaled_linear", "v", 0.5, False, 1, "leading", True, 50),
    ("linear", "epsilon", 1.0, False, 1, "leading", False, 1),
]


@pytest.mark.parametrize("schedule,prediction,eta,alpha_to_one,offset,spacing,clip,steps",
                         DDIM_CASES)
def test_ddim_trajectory_matches_diffusers(schedule, prediction, eta, alpha_to_one, offset,
                                           spacing, clip, steps):
  process = gaussian_process(schedule, prediction)
  ref = diffusers.DDIMScheduler(set_alpha_to_one=alpha_to_one, steps_offset=offset,
                                timestep_spacing=spacing,
                                **scheduler_kwargs(schedule, prediction, clip))
  ref.set_timesteps(steps)

  timesteps, prev = samplers.gaussian_timesteps(T, steps, spacing, offset, prev_rule="stride")
  np.testing.assert_array_equal(timesteps, ref.timesteps.numpy())
  np.testing.assert_array_equal(prev, ref.timesteps.numpy() - T // steps)
  final_alpha_bar = 1.0 if alpha_to_one else float(process.alphas_cumprod[0])
  assert final_alpha_bar == float(ref.final_alpha_cumprod)

  key = noise_key(3)
  x = x_init(1)
  ours = samplers.ddim_sample(model_jax, process, x, key, timesteps, prev, eta=eta,
                              final_alpha_bar=final_alpha_bar, clip_x0=1.0 if clip else None)
  noises = step_noises(key, steps) if eta > 0 else None
  assert_parity(ours, ddim_reference(ref, x, noises, eta),
                f"ddim {schedule}/{prediction}/eta={eta}/alpha_to_one={alpha_to_one}"
                f"/offset={offset}/{spacing}/clip={clip}/n={steps}")


# -- flow matching Euler -------------------------------------------------------------
@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 5, 28])
def test_flow_euler_trajectory_matches_diffusers(shift, steps):
  process = RectifiedFlow(shift=shift, num_train_timesteps=T)
  ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
  ref.set_timesteps(steps)

  sigmas = samplers.flow_sigmas(steps, shift, T)
  assert sigmas.dtype == np.float32 and sigmas.shape == (steps + 1,)
  # Same float64-then-float32 recipe as diffusers, so the σ grids are identical.
  np.testing.assert_array_equal(sigmas, ref.sigmas.numpy())
  assert sigmas[0] == 1.0 and sigmas[-1] == 0.0

  x = x_init(2)
  times = []
  ours = samplers.flow_euler_sample(recording(model_jax, times), process, x, sigmas)
  # The model is fed timestep = σ·1000: exactly the scheduler's timesteps.
  np.testing.assert_array_equal(np.stack(times),
                                np.repeat(ref.timesteps.numpy()[:, None], SHAPE[0], 1))
  assert_parity(ours, euler_reference(ref, x), f"euler shift={shift}/n={steps}")


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
                                  **scheduler_kwargs("cosine", "x0", True))
    ref.set_timesteps(10)
    ts, prev = samplers.gaussian_timesteps(T, 10, "trailing")
    ours = samplers.ddpm_sample(model_jax, process, x, key, ts, prev, "fixed_large", 1.0)
    assert rel_err(ours, ddpm_reference(ref, x, noises, monkeypatch)) == 0.0

    process = gaussian_process("scaled_linear", "v")
    ref = diffusers.DDIMScheduler(set_alpha_to_one=False, steps_offset=1,
                                  **scheduler_kwargs("scaled_linear", "v", False))
    ref.set_timesteps(10)
    ts, prev = samplers.gaussian_timesteps(T, 10, "leading", 1, prev_rule="stride")
    ours = samplers.ddim_sample(model_jax, process, x, key, ts, prev, eta=1.0,
                                final_alpha_bar=float(process.alphas_cumprod[0]))
    assert rel_err(ours, ddim_reference(ref, x, noises, 1.0)) == 0.0

    ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=3.0)
    ref.set_timesteps(10)
    ours = samplers.flow_euler_sample(model_jax, RectifiedFlow(shift=3.0), x,
                                      samplers.flow_sigmas(10, 3.0, T))
    assert rel_err(ours, euler_reference(ref, x)) == 0.0


# -- the run_sampler dispatcher ------------------------------------------------------
def _sample_config(**fields):
  base = dict(sampler="ddpm", num_steps=10, timestep_spacing="leading", steps_offset=0,
              eta=0.0, final_alpha_bar=1.0, variance="fixed_small", clip_x0=None)
  base.update(fields)
  return ml_collections.ConfigDict(base)


def _run_sampler_case(name):
  """(process, sample config, diffusers scheduler, η) for one sampler."""
  if name == "ddpm":
    ref = diffusers.DDPMScheduler(variance_type="fixed_large", timestep_spacing="trailing",
                                  **scheduler_kwargs("cosine", "v", True))
    return (gaussian_process("cosine", "v"),
            _sample_config(sampler="ddpm", timestep_spacing="trailing", variance="fixed_large",
                           clip_x0=1.0), ref, None)
  if name == "ddim":
    process = gaussian_process("linear", "epsilon")
    ref = diffusers.DDIMScheduler(set_alpha_to_one=False, steps_offset=1,
                                  timestep_spacing="leading",
                                  **scheduler_kwargs("linear", "epsilon", False))
    return (process, _sample_config(sampler="ddim", steps_offset=1, eta=0.5,
                                    final_alpha_bar=float(process.alphas_cumprod[0])), ref, 0.5)
  ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=3.0)
  return (RectifiedFlow(shift=3.0, num_train_timesteps=T),
          _sample_config(sampler="euler", num_steps=5), ref, None)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler"])
def test_run_sampler(monkeypatch, name):
  process, config, ref, eta = _run_sampler_case(name)
  sample = jax.jit(lambda key: samplers.run_sampler(process, model_jax, SHAPE, key, config))
  key = jax.random.PRNGKey(11)
  first = np.asarray(sample(key))
  again = np.asarray(sample(key))
  other = np.asarray(sample(jax.random.PRNGKey(12)))
  assert first.shape == SHAPE and first.dtype == np.float32
  assert np.all(np.isfinite(first))
  np.testing.assert_array_equal(first, again)
  assert np.abs(first - other).max() > 1e-2

  # The config is wired through: the same trajectory as diffusers from
  # x_T = normal(split(key)[0]) with step noises normal(fold_in(split(key)[1], i)).
  init_key, step_key = jax.random.split(key)
  x = np.asarray(jax.random.normal(init_key, SHAPE, jnp.float32))
  ref.set_timesteps(config.num_steps)
  if name == "ddpm":
    theirs = ddpm_reference(ref, x, step_noises(step_key, config.num_steps), monkeypatch)
  elif name == "ddim":
    theirs = ddim_reference(ref, x, step_noises(step_key, config.num_steps), eta)
  else:
    theirs = euler_reference(ref, x)
  assert_parity(first, theirs, f"run_sampler {name}")


def test_run_sampler_ddim_respaced_and_bad_sampler():
  process = gaussian_process("linear", "epsilon")
  config = _sample_config(sampler="ddim", timestep_spacing="respace", num_steps="ddim25")
  out = samplers.run_sampler(process, model_jax, SHAPE, noise_key(0), config)
  assert out.shape == SHAPE and bool(jnp.all(jnp.isfinite(out)))
  # `sample.respacing` (the config file's field) selects the same respaced chain.
  by_field = samplers.run_sampler(process, model_jax, SHAPE, noise_key(0),
                                  _sample_config(sampler="ddim", respacing="ddim25"))
  np.testing.assert_array_equal(np.asarray(by_field), np.asarray(out))
  with pytest.raises(UserError, match="'ddim1001'"):  # more strided steps than timesteps
    samplers.run_sampler(process, model_jax, SHAPE, noise_key(0),
                         _sample_config(sampler="ddim", respacing="ddim1001"))
  with pytest.raises(UserError):
    samplers.run_sampler(process, model_jax, SHAPE, noise_key(0),
                         _sample_config(sampler="euler"))
  with pytest.raises(UserError):
    samplers.run_sampler(RectifiedFlow(), model_jax, SHAPE, noise_key(0),
                         _sample_config(sampler="ddim"))


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
