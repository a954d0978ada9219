"""Euler, Heun and DPM-Solver samplers (sigma_samplers.py) against diffusers' schedulers.

Schedules (timesteps, σ, init_noise_sigma) are compared exactly with diffusers'
`set_timesteps` for every σ / timestep option. Full trajectories are compared with a
hand-written diffusers pipeline loop (`x_T · init_noise_sigma`, `scale_model_input`,
the model, `step`) driven by the same deterministic model, written once for JAX and
once for torch, from the same x_T and with the same per-step noise
(`normal(fold_in(key, i))`, fed to diffusers as its `randn_tensor` / `variance_noise`).
The torch loop runs in NCHW (what diffusers' learned-variance slicing `[:, :3]` assumes);
our samplers in NHWC.

Schedules are computed on the host with diffusers' dtypes and operation order (most
grids are bit-identical; float32 log / exp, numpy's vs torch's, may differ by an ulp).
Run op by op, Euler and Heun trajectories are bit-identical to diffusers'
(`test_formulas_are_diffusers_own`). Compiled, XLA contracts a·b + c into fused
multiply-adds (one rounding where torch rounds twice; only --xla_cpu_max_isa=AVX, no
FMA instructions, switches that off) and may reassociate the noise draw's last
multiplication with the churn coefficient, so trajectories differ at the 1e-7 to 2e-6
level: the tolerance is 1e-5 relative. Where σ_max ≫ σ_1 (the cosine
schedule, σ_max ≈ 2e4; zero terminal SNR, 4096) the first step cancels and amplifies
last-ulp differences ~σ_max/σ_1-fold. There diffusers' float32 result is itself 2.5e-5 to
1.5e-3 away from the same computation in float64, and the tolerance is twice that
distance: we must agree with diffusers to within its own float32 rounding noise.

The per-step noise uses the "rbg" PRNG (fast to compile), as tests/test_samplers.py does.
"""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.schedulers import scheduling_euler_discrete

from ldm_jax.diffusion import schedules, sigma_samplers
from ldm_jax.diffusion.gaussian import GaussianDiffusion
from ldm_jax.errors import UserError
from tests import sampler_models
from tests.sampler_models import model_jax, model_torch, noise_key

T = 1000
SHAPE = (2, 8, 8, 3)
TOL = 1e-5  # max|ours - diffusers| / max|diffusers| over the final sample

DIFFUSERS_SCHEDULE = {"linear": "linear", "scaled_linear": "scaled_linear",
                      "cosine": "squaredcos_cap_v2"}
DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}
BETA_RANGE = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012),
              "cosine": (1e-4, 0.02)}
SCHEDULERS = {"euler": diffusers.EulerDiscreteScheduler,
              "heun": diffusers.HeunDiscreteScheduler,
              "dpm": diffusers.DPMSolverMultistepScheduler}
BUILDERS = {"euler": sigma_samplers.euler_sampler, "heun": sigma_samplers.heun_sampler,
            "dpm": sigma_samplers.dpm_solver_sampler}
EULER_STEP_ARGS = ("s_churn", "s_tmin", "s_tmax", "s_noise")
WORST = {}  # worst relative error per scheduler, printed at the end


# -- the shared deterministic model: tests/sampler_models.py ----------------------
def model_jax_learned(x, t):
  """`model_jax` plus a "learned variance" half of the channels (to be dropped)."""
  return jnp.concatenate([model_jax(x, t), x * 7.0 + 3.0], axis=-1)


def model_torch_learned(x, t):
  return torch.cat([model_torch(x, t), x * 7.0 + 3.0], dim=1)  # NCHW


def rel_err(ours, theirs):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def assert_parity(ours, theirs, name, label, tol=TOL):
  assert np.all(np.isfinite(np.asarray(theirs))), f"{label}: diffusers diverged"
  err = rel_err(ours, theirs)
  kind = (name, "well-conditioned" if tol == TOL else "ill-conditioned")
  WORST[kind] = max(WORST.get(kind, 0.0), err)
  print(f"[parity] {label}: max rel err {err:.3g}")
  assert err <= tol, f"{label}: max rel err {err:.3g} > {tol:g}"


def x_init(seed=0):
  return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def step_noises(key, n):
  return sampler_models.step_noises(key, n, SHAPE)


def nchw(a):
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(a), -1, 1)))


# -- processes and reference schedulers ---------------------------------------------------
def zero_snr_betas(schedule):
  """diffusers' own rescaled betas (so the test does not depend on schedules.py's copy)."""
  beta_start, beta_end = BETA_RANGE[schedule]
  ref = diffusers.EulerDiscreteScheduler(num_train_timesteps=T, beta_start=beta_start,
                                         beta_end=beta_end,
                                         beta_schedule=DIFFUSERS_SCHEDULE[schedule],
                                         rescale_betas_zero_snr=True)
  return ref.betas.numpy()


def make_process(schedule, prediction, zero_snr=False):
  beta_start, beta_end = BETA_RANGE[schedule]
  if zero_snr:
    return GaussianDiffusion(betas=zero_snr_betas(schedule), prediction=prediction,
                             zero_terminal_snr=True)
  return GaussianDiffusion(betas=schedules.make_betas(schedule, T, beta_start, beta_end),
                           prediction=prediction)


def make_reference(name, schedule, prediction, zero_snr, options):
  """The diffusers scheduler with the process's config and these (config) options."""
  beta_start, beta_end = BETA_RANGE[schedule]
  config = {k: v for k, v in options.items() if k not in EULER_STEP_ARGS}
  kwargs = dict(num_train_timesteps=T, beta_start=beta_start, beta_end=beta_end,
                beta_schedule=DIFFUSERS_SCHEDULE[schedule],
                prediction_type=DIFFUSERS_PREDICTION[prediction])
  if zero_snr and name == "heun":  # Heun has no rescale option: its betas, Euler's ᾱ_T
    kwargs["trained_betas"] = zero_snr_betas(schedule)
  elif zero_snr:
    kwargs["rescale_betas_zero_snr"] = True
  ref = SCHEDULERS[name](**kwargs, **config)
  if zero_snr and name == "heun":
    ref.alphas_cumprod[-1] = 2.0 ** -24
  return ref


def reference_trajectory(name, ref, steps, x, noises, monkeypatch, options, learned=False,
                         float64=False):
  """A diffusers pipeline's denoising loop (NCHW) from x_T = x, step i's noise noises[i].

  float64: the same loop with the σ grid, sample, noise and model in float64 (diffusers'
  `step` still rounds its input sample to float32): how far this lands from the float32
  loop measures the float32 rounding noise of diffusers' own computation.
  """
  ref.set_timesteps(steps)
  dtype = torch.float64 if float64 else torch.float32
  if float64:
    ref.sigmas = ref.sigmas.to(torch.float64)
  model = model_torch_learned if learned else model_torch
  state = {"step": 0}
  if noises is not None:
    monkeypatch.setattr(scheduling_euler_discrete, "randn_tensor",
                        lambda shape, **kw: nchw(noises[state["step"]]).to(dtype))
  step_args = {k: v for k, v in options.items() if k in EULER_STEP_ARGS}
  init_sigma = ref.init_noise_sigma
  sample = nchw(x).to(dtype) * (init_sigma.to(dtype) if torch.is_tensor(init_sigma)
                                else init_sigma)
  with torch.no_grad():
    for i, t in enumerate(ref.timesteps):
      state["step"] = i
      model_input = ref.scale_model_input(sample, t)
      output = model(model_input, t.to(dtype) if float64 else t)
      if name == "dpm":
        extra = {"variance_noise": nchw(noises[i]).to(dtype)} if noises is not None else {}
      else:
        extra = step_args
      sample = ref.step(output, t, sample, **extra).prev_sample.to(dtype)
  return np.moveaxis(sample.numpy(), 1, -1)


def run_case(monkeypatch, name, schedule, prediction, steps, options, zero_snr=False,
             learned=False, seed=0, jit=True):
  """Our sampler vs the diffusers loop; returns (error, float32 noise of diffusers' own)."""
  process = make_process(schedule, prediction, zero_snr)
  ref = make_reference(name, schedule, prediction, zero_snr, options)
  stochastic = options.get("s_churn", 0) > 0 or options.get("algorithm_type", "").startswith(
      "sde")
  key = noise_key(seed + 100)
  x = x_init(seed)
  ref.set_timesteps(steps)
  noises = step_noises(key, len(ref.timesteps)) if stochastic else None
  theirs = reference_trajectory(name, ref, steps, x, noises, monkeypatch, options, learned)
  sample = BUILDERS[name](process, steps, **options)
  with jax.disable_jit(not jit):
    ours = sample(model_jax_learned if learned else model_jax, jnp.asarray(x), key)
  assert ours.shape == SHAPE and ours.dtype == jnp.float32
  label = f"{name} {schedule}/{prediction}/n={steps}/zero_snr={zero_snr} {options}"
  if not jit:
    return rel_err(ours, theirs), label
  ref = make_reference(name, schedule, prediction, zero_snr, options)
  exact = reference_trajectory(name, ref, steps, x, noises, monkeypatch, options, learned,
                               float64=True)
  noise32 = rel_err(theirs, exact)
  print(f"[parity] {label}: diffusers float32 vs float64 {noise32:.3g}")
  assert_parity(ours, theirs, name, label, max(TOL, 2 * noise32))
  return rel_err(ours, theirs), label


# -- schedules: exact ---------------------------------------------------------------------
SCHEDULE_CASES = [
    # name, schedule, zero_snr, steps, options
    ("euler", "scaled_linear", False, 10, {}),
    ("euler", "linear", False, 7, dict(timestep_spacing="leading", steps_offset=1)),
    ("euler", "cosine", False, 9, dict(timestep_spacing="trailing")),
    ("euler", "scaled_linear", False, 10, dict(use_karras_sigmas=True)),
    ("euler", "scaled_linear", False, 10, dict(use_karras_sigmas=True, sigma_min=0.1,
                                               sigma_max=10.0)),
    ("euler", "linear", False, 12, dict(use_exponential_sigmas=True, timestep_spacing="leading")),
    ("euler", "cosine", False, 8, dict(use_beta_sigmas=True, final_sigmas_type="sigma_min")),
    ("euler", "scaled_linear", False, 6, dict(use_beta_sigmas=True, sigma_max=5.0)),
    ("euler", "linear", False, 10, dict(interpolation_type="log_linear")),
    ("euler", "linear", False, 10, dict(interpolation_type="log_linear", use_karras_sigmas=True)),
    ("euler", "scaled_linear", True, 10, dict(timestep_spacing="trailing")),
    ("euler", "cosine", True, 10, dict(use_karras_sigmas=True)),
    ("euler", "scaled_linear", False, 10, dict(timestep_type="continuous")),
    ("heun", "scaled_linear", False, 10, {}),
    ("heun", "linear", False, 6, dict(timestep_spacing="leading", steps_offset=1)),
    ("heun", "cosine", False, 7, dict(timestep_spacing="trailing", use_karras_sigmas=True)),
    ("heun", "scaled_linear", False, 9, dict(use_exponential_sigmas=True)),
    ("heun", "linear", False, 8, dict(use_beta_sigmas=True)),
    ("heun", "scaled_linear", True, 6, {}),
    ("dpm", "linear", False, 10, {}),
    ("dpm", "scaled_linear", False, 12, dict(timestep_spacing="leading", steps_offset=1)),
    ("dpm", "cosine", False, 9, dict(timestep_spacing="trailing")),
    ("dpm", "scaled_linear", False, 10, dict(use_karras_sigmas=True)),
    ("dpm", "cosine", False, 10, dict(use_karras_sigmas=True)),  # truncated, not rounded
    ("dpm", "linear", False, 10, dict(use_lu_lambdas=True)),
    ("dpm", "cosine", False, 11, dict(use_lu_lambdas=True)),
    ("dpm", "scaled_linear", False, 8, dict(use_exponential_sigmas=True)),
    ("dpm", "linear", False, 8, dict(use_beta_sigmas=True, final_sigmas_type="sigma_min")),
    ("dpm", "cosine", False, 10, dict(lambda_min_clipped=-5.1)),
    ("dpm", "cosine", False, 10, dict(lambda_min_clipped=-5.1, timestep_spacing="leading")),
    ("dpm", "scaled_linear", True, 10, dict(timestep_spacing="trailing")),
    ("dpm", "scaled_linear", True, 10, dict(lambda_min_clipped=-3.0)),
]


@pytest.mark.parametrize("name,schedule,zero_snr,steps,options", SCHEDULE_CASES)
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_schedules_match_diffusers(name, schedule, zero_snr, steps, options, prediction):
  process = make_process(schedule, prediction, zero_snr)
  ref = make_reference(name, schedule, prediction, zero_snr, options)
  ref.set_timesteps(steps)
  if name == "euler":
    ts, sigmas, init_sigma, _ = sigma_samplers.euler_schedule(process, steps, **options)
  elif name == "heun":
    ts, sigmas, init_sigma, _ = sigma_samplers.heun_schedule(process, steps, **options)
  else:
    ts, sigmas, _ = sigma_samplers.dpm_solver_schedule(process, steps, **options)
    init_sigma = 1.0
  their_ts = ref.timesteps.numpy()
  if name == "dpm":
    np.testing.assert_array_equal(ts, their_ts)
  else:  # continuous v timesteps are 0.25·log σ: numpy's and torch's float32 log may differ
    np.testing.assert_allclose(ts, their_ts, rtol=2e-7, atol=0)
  assert sigmas.dtype == np.float32
  np.testing.assert_allclose(sigmas, ref.sigmas.numpy(), rtol=2e-7, atol=0)
  assert float(init_sigma) == pytest.approx(float(ref.init_noise_sigma), rel=2e-7)


def test_schedules_are_mostly_bit_identical():
  """Without float32 transcendental functions in the way, the grids are diffusers' own."""
  process = make_process("scaled_linear", "epsilon")
  for name, fn, options in [
      ("euler", sigma_samplers.euler_schedule, dict(use_karras_sigmas=True)),
      ("heun", sigma_samplers.heun_schedule, dict(timestep_spacing="trailing")),
      ("dpm", sigma_samplers.dpm_solver_schedule, dict(use_lu_lambdas=True))]:
    ref = make_reference(name, "scaled_linear", "epsilon", False, options)
    ref.set_timesteps(10)
    out = fn(process, 10, **options)
    np.testing.assert_array_equal(out[0], ref.timesteps.numpy())
    np.testing.assert_array_equal(out[1], ref.sigmas.numpy())


# -- trajectories -------------------------------------------------------------------------
EULER_CASES = [
    # schedule, prediction, steps, zero_snr, options
    ("scaled_linear", "epsilon", 10, False, {}),
    ("linear", "v", 8, False, dict(use_karras_sigmas=True, timestep_spacing="leading",
                                   steps_offset=1)),
    ("cosine", "x0", 7, False, dict(use_exponential_sigmas=True, timestep_spacing="trailing")),
    ("scaled_linear", "epsilon", 6, False, dict(use_beta_sigmas=True,
                                                final_sigmas_type="sigma_min")),
    ("linear", "v", 9, False, dict(interpolation_type="log_linear")),
    ("scaled_linear", "v", 8, False, dict(timestep_type="continuous", use_karras_sigmas=True,
                                          sigma_min=0.05, sigma_max=12.0)),
    ("scaled_linear", "epsilon", 8, False, dict(s_churn=1.0, s_tmin=0.5, s_tmax=10.0)),
    ("cosine", "v", 6, False, dict(s_churn=0.5, s_noise=1.003)),
    ("scaled_linear", "v", 8, True, dict(timestep_spacing="trailing")),
    ("linear", "epsilon", 5, True, dict(use_karras_sigmas=True, s_churn=2.0)),
    ("scaled_linear", "epsilon", 30, False, dict(timestep_spacing="trailing")),
]


@pytest.mark.parametrize("schedule,prediction,steps,zero_snr,options", EULER_CASES)
def test_euler_trajectory_matches_diffusers(monkeypatch, schedule, prediction, steps, zero_snr,
                                            options):
  run_case(monkeypatch, "euler", schedule, prediction, steps, options, zero_snr)


HEUN_CASES = [
    ("scaled_linear", "epsilon", 6, False, {}),
    ("linear", "v", 5, False, dict(use_karras_sigmas=True, timestep_spacing="leading",
                                   steps_offset=1)),
    ("cosine", "x0", 5, False, dict(use_exponential_sigmas=True, clip_sample=True,
                                    clip_sample_range=0.8)),
    ("scaled_linear", "v", 4, False, dict(use_beta_sigmas=True, timestep_spacing="trailing")),
    ("scaled_linear", "epsilon", 5, True, dict(timestep_spacing="trailing")),
    ("scaled_linear", "v", 25, False, dict(use_karras_sigmas=True)),
]


@pytest.mark.parametrize("schedule,prediction,steps,zero_snr,options", HEUN_CASES)
def test_heun_trajectory_matches_diffusers(monkeypatch, schedule, prediction, steps, zero_snr,
                                           options):
  run_case(monkeypatch, "heun", schedule, prediction, steps, options, zero_snr)


DPM_CASES = [
    # schedule, prediction, steps, zero_snr, learned, options
    ("scaled_linear", "epsilon", 10, False, False, {}),
    ("scaled_linear", "epsilon", 50, False, False, dict(use_karras_sigmas=True)),
    ("linear", "v", 30, False, False, dict(final_sigmas_type="sigma_min", solver_order=3)),
    ("linear", "v", 8, False, False, dict(solver_order=1)),
    ("scaled_linear", "x0", 10, False, False, dict(solver_order=3, use_karras_sigmas=True)),
    ("scaled_linear", "epsilon", 16, False, False,
     dict(solver_order=3, solver_type="heun", final_sigmas_type="sigma_min",
          lower_order_final=False, timestep_spacing="trailing")),
    ("scaled_linear", "v", 8, False, False, dict(solver_type="heun", use_lu_lambdas=True)),
    ("linear", "epsilon", 9, False, True, dict(variance_type="learned_range",
                                               use_exponential_sigmas=True)),
    ("scaled_linear", "x0", 8, False, False, dict(thresholding=True, sample_max_value=1.5,
                                                  dynamic_thresholding_ratio=0.9)),
    ("cosine", "epsilon", 10, False, False, dict(lambda_min_clipped=-5.1, euler_at_final=True,
                                                 final_sigmas_type="sigma_min")),
    ("linear", "v", 9, False, False, dict(use_beta_sigmas=True, timestep_spacing="leading")),
    ("scaled_linear", "epsilon", 10, False, False, dict(algorithm_type="sde-dpmsolver++")),
    ("linear", "v", 10, False, False, dict(algorithm_type="sde-dpmsolver++", solver_order=3,
                                           timestep_spacing="leading", steps_offset=1)),
    ("linear", "x0", 8, False, False, dict(algorithm_type="sde-dpmsolver++",
                                           solver_type="heun", use_karras_sigmas=True)),
    ("scaled_linear", "epsilon", 10, False, False, dict(algorithm_type="dpmsolver",
                                                        final_sigmas_type="sigma_min")),
    ("linear", "x0", 9, False, False, dict(algorithm_type="dpmsolver", solver_order=3,
                                           final_sigmas_type="sigma_min", thresholding=True)),
    ("cosine", "v", 8, False, False, dict(algorithm_type="dpmsolver", solver_type="heun",
                                          final_sigmas_type="sigma_min")),
    ("scaled_linear", "epsilon", 8, False, False, dict(algorithm_type="sde-dpmsolver",
                                                       final_sigmas_type="sigma_min")),
    ("linear", "v", 8, False, False, dict(algorithm_type="sde-dpmsolver", solver_type="heun",
                                          final_sigmas_type="sigma_min")),
    ("scaled_linear", "v", 10, True, False, dict(timestep_spacing="trailing")),
    ("scaled_linear", "epsilon", 8, True, False, dict(algorithm_type="sde-dpmsolver++",
                                                      timestep_spacing="trailing")),
]


@pytest.mark.parametrize("schedule,prediction,steps,zero_snr,learned,options", DPM_CASES)
def test_dpm_solver_trajectory_matches_diffusers(monkeypatch, schedule, prediction, steps,
                                                 zero_snr, learned, options):
  run_case(monkeypatch, "dpm", schedule, prediction, steps, options, zero_snr, learned)


ILL_CONDITIONED = [
    # σ_max ≫ σ_1 (cosine: σ_max ≈ 2e4; zero SNR: 4096): the first step x + d·dt cancels,
    # so float32 roundings are amplified ~σ_max/σ_1-fold (diffusers' own float32 result is
    # 2.5e-5 to 1.5e-3 from its float64 self here; see the tolerance of `run_case`).
    ("euler", "cosine", "v", 6, False, dict(s_churn=0.5, s_noise=1.003)),
    ("euler", "scaled_linear", "v", 8, True, dict(timestep_spacing="trailing")),
    ("heun", "cosine", "x0", 5, False, dict(use_exponential_sigmas=True, clip_sample=True)),
    ("dpm", "cosine", "v", 8, False, dict(algorithm_type="dpmsolver", solver_type="heun",
                                          final_sigmas_type="sigma_min")),
]


@pytest.mark.parametrize("name,schedule,prediction,steps,zero_snr,options", ILL_CONDITIONED)
def test_formulas_are_diffusers_own(monkeypatch, name, schedule, prediction, steps, zero_snr,
                                    options):
  """Op by op (no XLA fusion: no fused multiply-adds), Euler and Heun trajectories are
  bit-identical to diffusers' even where float32 rounding is amplified 1000-fold; the
  compiled differences are XLA's fused multiply-adds. DPM-Solver's per-step coefficients
  come from numpy's float32 exp/log, which may differ from torch's by an ulp."""
  err, label = run_case(monkeypatch, name, schedule, prediction, steps, options, zero_snr,
                        jit=False)
  print(f"[parity] op by op {label}: {err:.3g}")
  assert err == 0.0 if name != "dpm" else err <= 1e-6


def test_worst_errors_report():
  """Prints the worst measured error per scheduler (run with -s to see it)."""
  for (name, kind), err in sorted(WORST.items()):
    print(f"[parity] worst {name} ({kind}): {err:.3g}")


# -- options -------------------------------------------------------------------------------
def test_unknown_and_bad_options_raise_user_error():
  process = make_process("linear", "epsilon")
  with pytest.raises(UserError, match="bogus"):
    sigma_samplers.euler_sampler(process, 10, bogus=1)
  with pytest.raises(UserError, match="use_lu_lambdas"):  # a DPM key, not Heun's
    sigma_samplers.heun_sampler(process, 10, use_lu_lambdas=True)
  with pytest.raises(UserError, match="prediction_type"):  # process-level, not an option
    sigma_samplers.dpm_solver_sampler(process, 10, prediction_type="epsilon")
  with pytest.raises(UserError, match="'karras'"):
    sigma_samplers.euler_sampler(process, 10, timestep_spacing="karras")
  with pytest.raises(UserError, match="'cubic'"):
    sigma_samplers.euler_sampler(process, 10, interpolation_type="cubic")
  with pytest.raises(UserError, match="use_karras_sigmas"):
    sigma_samplers.heun_sampler(process, 10, use_karras_sigmas=True, use_beta_sigmas=True)
  with pytest.raises(UserError, match="'deis'"):
    sigma_samplers.dpm_solver_sampler(process, 10, algorithm_type="deis")
  with pytest.raises(UserError, match="solver_order"):
    sigma_samplers.dpm_solver_sampler(process, 10, solver_order=4)
  with pytest.raises(UserError, match="final_sigmas_type"):  # diffusers refuses it too
    sigma_samplers.dpm_solver_sampler(process, 10, algorithm_type="dpmsolver")
  with pytest.raises(UserError, match="sde-dpmsolver"):
    sigma_samplers.dpm_solver_sampler(process, 10, algorithm_type="sde-dpmsolver",
                                      solver_order=3, final_sigmas_type="sigma_min")
  with pytest.raises(UserError, match="use_flow_sigmas"):
    sigma_samplers.dpm_solver_sampler(process, 10, use_flow_sigmas=True)
  with pytest.raises(UserError, match="mu applies to flow sigmas"):
    sigma_samplers.dpm_solver_sampler(process, 10, use_dynamic_shifting=True, mu=0.5)
  with pytest.raises(UserError, match="num_inference_steps"):
    sigma_samplers.dpm_solver_sampler(process, 0)
  # A zero-terminal-SNR schedule not flagged as such has σ_T = ∞.
  unflagged = GaussianDiffusion(betas=zero_snr_betas("linear"), prediction="v")
  with pytest.raises(UserError, match="zero_terminal_snr"):
    sigma_samplers.euler_sampler(unflagged, 10)


@pytest.mark.parametrize("steps,config,mu", [
    (10, dict(flow_shift=3.0), None), (7, dict(num_train_timesteps=500), None),
    (12, dict(use_dynamic_shifting=True, flow_shift=2.0), 0.8)])
def test_dpm_flow_schedule_matches_diffusers(steps, config, mu):
  """DPM-Solver in diffusers' flow-matching mode (SANA): σ and the truncated integer
  timesteps are diffusers' own; mu replaces flow_shift by e^mu."""
  from ldm_jax.diffusion.flow import RectifiedFlow  # pylint: disable=import-outside-toplevel
  config = dict(config, use_flow_sigmas=True)
  ref = diffusers.DPMSolverMultistepScheduler(prediction_type="flow_prediction", **config)
  ref.set_timesteps(steps, **({} if mu is None else dict(mu=mu)))
  process = RectifiedFlow(shift=config.get("flow_shift", 1.0),
                          num_train_timesteps=config.get("num_train_timesteps", 1000))
  options = {k: v for k, v in config.items() if k != "num_train_timesteps"}
  ts, sigmas, _ = sigma_samplers.dpm_solver_schedule(process, steps, mu=mu, **options)
  np.testing.assert_array_equal(ts, ref.timesteps.numpy())
  np.testing.assert_array_equal(sigmas, ref.sigmas.numpy())
  with pytest.raises(UserError, match="cannot be combined with use_flow_sigmas"):
    sigma_samplers.dpm_solver_sampler(process, steps, use_karras_sigmas=True, **options)


# -- jit, determinism, guidance -------------------------------------------------------------
def test_jit_with_traced_params_and_determinism():
  process = make_process("scaled_linear", "epsilon")
  sample_fn = sigma_samplers.dpm_solver_sampler(process, 6, algorithm_type="sde-dpmsolver++")

  @jax.jit
  def run(scale, key):
    return sample_fn(lambda x, t: model_jax(x, t) * scale, jnp.asarray(x_init(3)), key)

  first = np.asarray(run(1.0, noise_key(1)))
  np.testing.assert_array_equal(first, np.asarray(run(1.0, noise_key(1))))
  assert np.abs(first - np.asarray(run(1.0, noise_key(2)))).max() > 1e-3
  assert np.abs(first - np.asarray(run(0.9, noise_key(1)))).max() > 1e-3
  # Jitted or not, the same trajectory (and with threefry keys too).
  eager = sample_fn(model_jax, jnp.asarray(x_init(3)), noise_key(1))
  assert rel_err(first, eager) < 1e-6
  churn = sigma_samplers.euler_sampler(process, 5, s_churn=1.0)
  a = churn(model_jax, jnp.asarray(x_init(3)), jax.random.PRNGKey(0))
  b = churn(model_jax, jnp.asarray(x_init(3)), jax.random.PRNGKey(0))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def point_mass_model(process):
  """The exact denoiser for data = the point 0: ε = x_t / sqrt(1 - ᾱ), x0 = 0, in the
  process's parametrisation, ᾱ interpolated at fractional timesteps as σ is by diffusers."""
  abar = process.alphas_cumprod
  sigmas = jnp.asarray(np.sqrt((1 - abar) / abar))

  def model(x, t):
    sigma = jnp.interp(t, jnp.arange(len(abar), dtype=jnp.float32), sigmas)
    sigma = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
    alpha = 1 / jnp.sqrt(1 + sigma * sigma)
    eps = x / (sigma * alpha)
    return {"epsilon": eps, "x0": jnp.zeros_like(x), "v": alpha * eps}[process.prediction]

  return model


@pytest.mark.parametrize("name,prediction", [("euler", "v"), ("heun", "x0"),
                                             ("dpm", "epsilon")])
def test_classifier_guidance(name, prediction):
  """g = 0 is the unguided sampler. With the exact denoiser of data at 0 (samples ≈ 0),
  a constant g = c > 0 (log p(y|x) = c·Σx, favouring larger x) gives x̂0 = (1-ᾱ)·c/sqrt(ᾱ)
  > 0 at every step, so the sample moves up (by ≈ (1-ᾱ)·c/sqrt(ᾱ) at the last σ)."""
  process = make_process("scaled_linear", prediction)
  model = point_mass_model(process)
  sample_fn = BUILDERS[name](process, 5)
  x, key = jnp.asarray(x_init(4)), noise_key(0)
  plain = np.asarray(sample_fn(model, x, key))
  assert np.abs(plain).max() < 1e-3
  zero = np.asarray(sample_fn(model, x, key, cond_fn=lambda x, t: jnp.zeros_like(x)))
  np.testing.assert_allclose(zero, plain, rtol=0, atol=1e-6)
  up = np.asarray(sample_fn(model, x, key, cond_fn=lambda x, t: jnp.full_like(x, 0.5)))
  assert np.all(np.isfinite(up))
  assert np.all(up - plain > 1e-4), (up - plain).min()  # ≈ σ_last²·c at the end
