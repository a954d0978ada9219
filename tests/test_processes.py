"""The process interface (GaussianDiffusion, RectifiedFlow), checked against diffusers'
schedulers where they define the same quantity, and classifier-free guidance."""

import diffusers
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from ldm_jax.diffusion import build_process
from ldm_jax.diffusion.flow import RectifiedFlow, shift_time
from ldm_jax.diffusion.gaussian import GaussianDiffusion
from ldm_jax.diffusion.guidance import guided_model_fn
from ldm_jax.diffusion.process import mean_flat
from ldm_jax.errors import UserError

T = 1000
SHAPE = (4, 8, 8, 3)
TIMES = np.array([0, 10, 500, 999], np.int32)  # one per example, both ends included
DIFFUSERS_SCHEDULE = {"linear": "linear", "scaled_linear": "scaled_linear",
                      "cosine": "squaredcos_cap_v2"}
BETA_RANGE = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012),
              "cosine": (1e-4, 0.02)}


def rel_err(ours, theirs):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def gaussian(schedule="linear", prediction="epsilon", num_timesteps=T):
  beta_start, beta_end = BETA_RANGE[schedule]
  return build_process(ml_collections.ConfigDict(dict(
      process="gaussian", beta_schedule=schedule, num_timesteps=num_timesteps,
      beta_start=beta_start, beta_end=beta_end, prediction=prediction)))


def ddpm_scheduler(schedule="linear"):
  beta_start, beta_end = BETA_RANGE[schedule]
  return diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_SCHEDULE[schedule],
                                 beta_start=beta_start, beta_end=beta_end)


def x0_and_noise(seed=0, shape=SHAPE):
  rng = np.random.default_rng(seed)
  return (rng.uniform(-1, 1, shape).astype(np.float32),
          rng.standard_normal(shape).astype(np.float32))


# -- construction ----------------------------------------------------------------------
def test_build_process():
  process = gaussian("cosine", "v", 300)
  assert isinstance(process, GaussianDiffusion)
  assert process.num_timesteps == 300 and process.prediction == "v"
  flow = build_process(ml_collections.ConfigDict(dict(
      process="flow", time_sampling="uniform", shift=3.0, num_timesteps=500)))
  assert isinstance(flow, RectifiedFlow)
  assert (flow.time_sampling, flow.shift, flow.num_train_timesteps) == ("uniform", 3.0, 500)
  with pytest.raises(UserError):
    build_process(ml_collections.ConfigDict(dict(process="vp_sde")))
  with pytest.raises(UserError):
    gaussian("linear", "score")
  with pytest.raises(UserError):
    RectifiedFlow(time_sampling="lognormal")
  with pytest.raises(UserError):
    RectifiedFlow(shift=0.0)


# -- Gaussian diffusion ----------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_gaussian_add_noise_matches_diffusers(schedule):
  process, ref = gaussian(schedule), ddpm_scheduler(schedule)
  x0, noise = x0_and_noise()
  ours = process.add_noise(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(TIMES))
  theirs = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise),
                         torch.from_numpy(TIMES.astype(np.int64)))
  err = rel_err(ours, theirs.numpy())
  print(f"[parity] add_noise {schedule}: max rel err {err:.3g}")
  assert err <= 1e-6


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_gaussian_targets(schedule):
  x0, noise = x0_and_noise(1)
  t = jnp.asarray(TIMES)
  ref = ddpm_scheduler(schedule)
  velocity = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise),
                              torch.from_numpy(TIMES.astype(np.int64))).numpy()
  ours = gaussian(schedule, "v").target(jnp.asarray(x0), jnp.asarray(noise), t)
  err = rel_err(ours, velocity)
  print(f"[parity] v target {schedule}: max rel err {err:.3g}")
  assert err <= 1e-6
  np.testing.assert_array_equal(gaussian(schedule, "epsilon").target(x0, noise, t), noise)
  np.testing.assert_array_equal(gaussian(schedule, "x0").target(x0, noise, t), x0)


def test_gaussian_alpha_bar_and_model_time():
  process = gaussian("cosine")
  table = process.alphas_cumprod
  np.testing.assert_array_equal(process.alpha_bar(jnp.asarray(TIMES)), table[TIMES])
  assert float(process.alpha_bar(jnp.asarray(-1))) == 1.0  # "before" t = 0: the clean image
  assert np.all(np.diff(table) < 0) and 0 < table[-1] < table[0] < 1
  mt = process.model_time(jnp.asarray(TIMES))
  assert mt.dtype == jnp.float32
  np.testing.assert_array_equal(mt, TIMES.astype(np.float32))
  t = process.sample_time(jax.random.PRNGKey(0), 4096)
  assert t.shape == (4096,) and jnp.issubdtype(t.dtype, jnp.integer)
  assert int(t.min()) == 0 and int(t.max()) == T - 1


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_gaussian_predict_x0_eps_inverts_the_target(schedule, prediction):
  process = gaussian(schedule, prediction)
  x0, noise = x0_and_noise(2)
  # Moderate times: at the ends the inversion divides by sqrt(ᾱ) or sqrt(1-ᾱ) ≈ 0.01 or
  # less (ε from x0 at t=0, x0 from ε at t=T-1) and float32 rounding is amplified by it.
  t = jnp.asarray([50, 250, 500, 900], jnp.int32)
  x_t = process.add_noise(x0, noise, t)
  target = process.target(x0, noise, t)
  x0_hat, eps_hat = process.predict_x0_eps(target, x_t, t)
  errs = rel_err(x0_hat, x0), rel_err(eps_hat, noise)
  print(f"[roundtrip] gaussian {schedule}/{prediction}: x0 {errs[0]:.3g}, eps {errs[1]:.3g}")
  assert max(errs) <= 1e-5
  # ᾱ given directly (a scalar, as the samplers do) is the same as giving t.
  for i in range(len(t)):
    abar = process.alpha_bar(t[i])
    x0_i, eps_i = process.predict_x0_eps(target[i:i + 1], x_t[i:i + 1], alpha_bar=abar)
    np.testing.assert_allclose(x0_i, x0_hat[i:i + 1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(eps_i, eps_hat[i:i + 1], rtol=0, atol=1e-6)


def test_gaussian_predict_x0_eps_at_the_ends():
  """At t = 0 and t = T-1 the inversion is ill-conditioned; still within float32 reason."""
  x0, noise = x0_and_noise(3)
  t = jnp.asarray(TIMES)
  for prediction in ("epsilon", "v", "x0"):
    process = gaussian("linear", prediction)
    x_t = process.add_noise(x0, noise, t)
    x0_hat, eps_hat = process.predict_x0_eps(process.target(x0, noise, t), x_t, t)
    assert rel_err(x0_hat, x0) <= 1e-3 and rel_err(eps_hat, noise) <= 1e-3, prediction


# -- rectified flow --------------------------------------------------------------------
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_add_noise_matches_diffusers_scale_noise(shift):
  ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
  ref.set_timesteps(28)
  x0, noise = x0_and_noise(4)
  idx = np.array([0, 5, 17, 27])
  sigmas = ref.sigmas.numpy()[idx]
  theirs = torch.stack([
      ref.scale_noise(torch.from_numpy(x0[i:i + 1]), ref.timesteps[k:k + 1],
                      torch.from_numpy(noise[i:i + 1]))[0] for i, k in enumerate(idx)]).numpy()
  ours = RectifiedFlow(shift=shift).add_noise(jnp.asarray(x0), jnp.asarray(noise),
                                              jnp.asarray(sigmas))
  err = rel_err(ours, theirs)
  print(f"[parity] flow add_noise shift={shift}: max rel err {err:.3g}")
  assert err <= 1e-6


def test_flow_target_model_time_and_inversion():
  flow = RectifiedFlow()
  x0, noise = x0_and_noise(5)
  t = jnp.asarray([0.05, 0.3, 0.7, 0.95], jnp.float32)
  np.testing.assert_array_equal(flow.target(x0, noise, t), noise - x0)
  np.testing.assert_allclose(flow.model_time(t), np.asarray(t) * 1000, rtol=1e-7)
  x_t = flow.add_noise(x0, noise, t)
  # The endpoints of the path: t = 0 is the data, t = 1 the noise.
  np.testing.assert_array_equal(flow.add_noise(x0, noise, jnp.zeros(4)), x0)
  np.testing.assert_array_equal(flow.add_noise(x0, noise, jnp.ones(4)), noise)
  x0_hat, eps_hat = flow.predict_x0_eps(flow.target(x0, noise, t), x_t, t)
  errs = rel_err(x0_hat, x0), rel_err(eps_hat, noise)
  print(f"[roundtrip] flow: x0 {errs[0]:.3g}, eps {errs[1]:.3g}")
  assert max(errs) <= 1e-5


def test_flow_x0_prediction():
  """A network that outputs the clean image: its velocity is exact for t >= min_time,
  the loss of the oracle is zero there, and samplers see the velocity."""
  flow = build_process(ml_collections.ConfigDict(dict(process="flow", prediction="x0",
                                                      min_time=0.05)))
  assert flow.prediction == "x0"
  x0, noise = x0_and_noise(4)
  t = jnp.asarray([0.05, 0.3, 0.7, 1.0], jnp.float32)
  x_t = flow.add_noise(x0, noise, t)
  oracle = lambda x, model_time: x0  # noqa: E731 - one data point: E[x0 | x_t] = x0
  velocity = flow.wrap_model(oracle)(x_t, flow.model_time(t))
  assert rel_err(velocity, noise - x0) <= 1e-5
  per_example, _ = flow.loss(oracle, x0, None, draws=(t, noise))
  assert float(jnp.max(per_example)) <= 1e-10 * float(jnp.mean((noise - x0) ** 2))
  # Below min_time the divisor is clamped: t = 0.01 gives a fifth of the velocity.
  small = jnp.full((4,), 0.01, jnp.float32)
  v_small = flow.velocity(x0, flow.add_noise(x0, noise, small), small)
  assert rel_err(v_small, 0.2 * (noise - x0)) <= 1e-5
  plain = RectifiedFlow()
  assert plain.wrap_model(oracle) is oracle
  with pytest.raises(UserError, match="valid: \\['velocity', 'x0'\\]"):
    build_process(ml_collections.ConfigDict(dict(process="flow", prediction="epsilon")))


def test_logit_normal_time_statistics():
  n, mean, std = 100_000, 0.3, 0.8
  flow = RectifiedFlow(time_sampling="logit_normal", logit_mean=mean, logit_std=std)
  t = np.asarray(flow.sample_time(jax.random.PRNGKey(0), n), np.float64)
  assert t.shape == (n,) and np.all((t > 0) & (t < 1))
  logit = np.log(t) - np.log1p(-t)
  # Standard errors of the sample mean and of the sample standard deviation.
  assert abs(logit.mean() - mean) <= 3 * std / np.sqrt(n)
  assert abs(logit.std(ddof=1) - std) <= 3 * std / np.sqrt(2 * (n - 1))
  # Shifting is applied on top of the same draw.
  shifted = RectifiedFlow(time_sampling="logit_normal", logit_mean=mean, logit_std=std,
                          shift=3.0).sample_time(jax.random.PRNGKey(0), n)
  np.testing.assert_allclose(shifted, shift_time(jnp.asarray(t, jnp.float32), 3.0), rtol=1e-6)


def test_uniform_time_statistics():
  n = 100_000
  t = np.asarray(RectifiedFlow(time_sampling="uniform").sample_time(jax.random.PRNGKey(1), n),
                 np.float64)
  assert np.all((t >= 0) & (t < 1))
  assert abs(t.mean() - 0.5) <= 3 * np.sqrt(1 / 12 / n)


@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0, 6.0])
def test_shift_time(shift):
  t = np.linspace(0, 1, 1001, dtype=np.float32)
  shifted = np.asarray(shift_time(jnp.asarray(t), shift))
  assert shifted[0] == 0.0 and shifted[-1] == 1.0
  assert np.all(np.diff(shifted) > 0)
  if shift == 1.0:
    np.testing.assert_array_equal(shifted, t)
  elif shift > 1:
    assert np.all(shifted[1:-1] > t[1:-1])  # more time at high noise
  else:
    assert np.all(shifted[1:-1] < t[1:-1])
  # The inverse is the shift by 1/shift (SD3 eq. 23 is a Möbius map).
  np.testing.assert_allclose(shift_time(shifted, 1 / shift), t, atol=2e-6)


# -- losses ----------------------------------------------------------------------------
def _gaussian_oracle(process, x0):
  """A model_fn returning the exact target, from x_t, the model time and the known x0:
  t is the model time, and ε = (x_t - sqrt(ᾱ)·x0) / sqrt(1-ᾱ)."""

  def model_fn(x_t, model_time):
    t = model_time.astype(jnp.int32)
    abar = process.alpha_bar(t).reshape(-1, 1, 1, 1)
    eps = (x_t - jnp.sqrt(abar) * x0) / jnp.sqrt(1 - abar)
    return process.target(x0, eps, t)

  return model_fn


def _flow_oracle(flow, x0):
  """ε = (x_t - (1-t)·x0) / t with t = model_time / 1000; the target is ε - x0."""

  def model_fn(x_t, model_time):
    t = (model_time / flow.num_train_timesteps).reshape(-1, 1, 1, 1)
    return (x_t - (1 - t) * x0) / t - x0

  return model_fn


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_gaussian_loss(prediction):
  process = gaussian("cosine", prediction)
  x0, _ = x0_and_noise(6)
  rng = jax.random.PRNGKey(3)
  loss, metrics = process.loss(_gaussian_oracle(process, x0), x0, rng)
  assert loss.shape == (SHAPE[0],)
  print(f"[loss] gaussian {prediction} oracle: {float(loss.max()):.3g}")
  # Zero up to the rounding of recovering ε from x_t (ε is divided by sqrt(1-ᾱ) ≥ 0.006).
  assert float(loss.max()) <= 1e-8
  np.testing.assert_allclose(metrics["loss"], loss.mean(), rtol=1e-6)

  # Deterministic for a fixed rng; a wrong model is penalised by its squared error; a
  # learned-variance head (extra channels) is ignored.
  zero_model = lambda x_t, mt: jnp.zeros_like(x_t)
  wrong, _ = process.loss(zero_model, x0, rng)
  np.testing.assert_array_equal(wrong, process.loss(zero_model, x0, rng)[0])
  assert float(wrong.min()) > 1e-2
  oracle = _gaussian_oracle(process, x0)
  with_head = lambda x_t, mt: jnp.concatenate([oracle(x_t, mt), 7 + jnp.zeros_like(x_t)], -1)
  np.testing.assert_allclose(process.loss(with_head, x0, rng)[0], loss, atol=1e-12)
  # The wrong model's loss is mean_flat(target²) at the times and noise the loss drew.
  seen = {}

  def spy(x_t, model_time):
    seen["x_t"], seen["t"] = x_t, model_time.astype(jnp.int32)
    return jnp.zeros_like(x_t)

  process.loss(spy, x0, rng)
  abar = process.alpha_bar(seen["t"]).reshape(-1, 1, 1, 1)
  eps = (seen["x_t"] - jnp.sqrt(abar) * x0) / jnp.sqrt(1 - abar)
  np.testing.assert_allclose(wrong, mean_flat(process.target(x0, eps, seen["t"]) ** 2),
                             rtol=1e-4)


@pytest.mark.parametrize("time_sampling", ["uniform", "logit_normal"])
def test_flow_loss(time_sampling):
  flow = RectifiedFlow(time_sampling=time_sampling, shift=3.0)
  x0, _ = x0_and_noise(7)
  rng = jax.random.PRNGKey(4)
  loss, metrics = flow.loss(_flow_oracle(flow, x0), x0, rng)
  assert loss.shape == (SHAPE[0],)
  print(f"[loss] flow {time_sampling} oracle: {float(loss.max()):.3g}")
  assert float(loss.max()) <= 1e-8
  np.testing.assert_allclose(metrics["loss"], loss.mean(), rtol=1e-6)
  wrong, _ = flow.loss(lambda x_t, mt: jnp.zeros_like(x_t), x0, rng)
  assert float(wrong.min()) > 1e-2
  np.testing.assert_array_equal(wrong, flow.loss(lambda x_t, mt: jnp.zeros_like(x_t), x0,
                                                 rng)[0])


def test_loss_is_jittable_and_differentiable():
  process = gaussian("linear", "epsilon")
  x0, _ = x0_and_noise(8)

  def objective(scale, rng):
    loss, _ = process.loss(lambda x_t, mt: scale * x_t, x0, rng)
    return loss.mean()

  value, grad = jax.jit(jax.value_and_grad(objective))(jnp.float32(0.5), jax.random.PRNGKey(0))
  assert np.isfinite(float(value)) and np.isfinite(float(grad)) and float(grad) != 0.0


# -- classifier-free guidance ----------------------------------------------------------
def _counting_apply(calls, out_channels):
  """A label-dependent apply_fn(x, t, labels) that records the shapes it is called with."""

  def apply_fn(x, t, labels):
    calls.append((x.shape, t, labels))
    lab = labels.astype(jnp.float32).reshape(-1, 1, 1, 1)
    tt = t.reshape(-1, 1, 1, 1)
    main = jnp.sin(x * (1.0 + 0.1 * lab)) + 0.01 * tt + 0.2 * lab
    extra = jnp.cos(x[..., :out_channels - x.shape[-1]] + lab) if out_channels > x.shape[-1] \
        else x[..., :0]
    return jnp.concatenate([main, extra], axis=-1)

  return apply_fn


def test_guidance_scale_one_is_the_conditional_model():
  calls = []
  apply_fn = _counting_apply(calls, 6)
  x, _ = x0_and_noise(9)
  t = jnp.asarray([1.0, 2.0, 3.0, 4.0])
  labels = jnp.asarray([0, 1, 2, 3])
  out = guided_model_fn(apply_fn, labels, null_label=10, scale=1.0, guided_channels=3)(x, t)
  assert len(calls) == 1 and calls[0][0] == SHAPE
  np.testing.assert_array_equal(out, apply_fn(x, t, labels))


@pytest.mark.parametrize("scale", [0.0, 4.0])
def test_guidance_combines_cond_and_uncond_in_one_call(scale):
  calls = []
  apply_fn = _counting_apply(calls, 6)  # 3 guided channels + 3 "learned variance" channels
  x, _ = x0_and_noise(10)
  t = jnp.asarray([1.0, 2.0, 3.0, 4.0])
  labels = jnp.asarray([0, 1, 2, 3])
  null = 10
  out = guided_model_fn(apply_fn, labels, null_label=null, scale=scale, guided_channels=3)(x, t)
  # One forward pass on the doubled batch [cond | uncond].
  assert len(calls) == 1
  shape, t_seen, labels_seen = calls[0]
  assert shape == (2 * SHAPE[0],) + SHAPE[1:]
  np.testing.assert_array_equal(t_seen, np.concatenate([t, t]))
  np.testing.assert_array_equal(labels_seen, [0, 1, 2, 3, null, null, null, null])

  cond = apply_fn(x, t, labels)
  uncond = apply_fn(x, t, jnp.full_like(labels, null))
  assert out.shape == cond.shape == (*SHAPE[:-1], 6)
  expected = uncond[..., :3] + scale * (cond[..., :3] - uncond[..., :3])
  np.testing.assert_allclose(out[..., :3], expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(out[..., 3:], cond[..., 3:])  # variance from the cond half
  if scale == 0.0:
    np.testing.assert_allclose(out[..., :3], uncond[..., :3], atol=1e-6)


def test_guidance_without_extra_channels_under_jit():
  calls = []
  apply_fn = _counting_apply(calls, 3)
  x, _ = x0_and_noise(11)
  t = jnp.asarray([5.0, 6.0, 7.0, 8.0])
  labels = jnp.asarray([4, 3, 2, 1])
  model_fn = guided_model_fn(apply_fn, labels, null_label=0, scale=2.5, guided_channels=3)
  out = jax.jit(model_fn)(x, t)
  cond, uncond = apply_fn(x, t, labels), apply_fn(x, t, jnp.zeros_like(labels))
  np.testing.assert_allclose(out, uncond + 2.5 * (cond - uncond), rtol=1e-5, atol=1e-6)


# -- schedules, conversions, weightings (diffusion core) -----------------------------
@pytest.mark.parametrize("schedule,diffusers_name", [
    ("sigmoid", "sigmoid"), ("laplace", "laplace"), ("cosine", "squaredcos_cap_v2")])
def test_more_beta_schedules_match_diffusers(schedule, diffusers_name):
  from ldm_jax.diffusion import schedules
  ours = schedules.make_betas(schedule, T, 1e-4, 0.02)
  theirs = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=diffusers_name,
                                   beta_start=1e-4, beta_end=0.02).betas.numpy()
  # sigmoid: torch's float32 sigmoid is not correctly rounded; ours is (1 ulp apart).
  np.testing.assert_allclose(ours, theirs, rtol=1e-6 if schedule == "sigmoid" else 0, atol=0)
  exp_betas = diffusers.HeunDiscreteScheduler(beta_schedule="exp").betas.numpy()
  np.testing.assert_array_equal(schedules.make_betas("exp", 1000), exp_betas)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr_matches_diffusers(schedule):
  from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr
  from ldm_jax.diffusion import schedules
  beta_start, beta_end = BETA_RANGE[schedule]
  betas = schedules.make_betas(schedule, T, beta_start, beta_end)
  ours = schedules.rescale_zero_terminal_snr(betas)
  theirs = rescale_zero_terminal_snr(torch.tensor(betas)).numpy()
  # torch's float32 sqrt is off by one ulp on ~1 % of inputs (numpy's is correctly
  # rounded): measured ≤ 3.6e-7 absolute on β.
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=5e-7)
  process = build_process(ml_collections.ConfigDict(dict(
      process="gaussian", beta_schedule=schedule, num_timesteps=T, beta_start=beta_start,
      beta_end=beta_end, prediction="v", rescale_zero_snr=True)))
  assert process.zero_terminal_snr and process.alphas_cumprod[-1] == 0.0
  np.testing.assert_allclose(process.alphas_cumprod[0], 1 - betas[0], rtol=1e-6)
  # At zero SNR x_T is pure noise and the v target is -x0.
  x0, noise = x0_and_noise(1)
  t = jnp.full((SHAPE[0],), T - 1)
  np.testing.assert_array_equal(process.add_noise(x0, noise, t), noise)
  np.testing.assert_array_equal(process.target(x0, noise, t), -x0)


@pytest.mark.parametrize("source", ["epsilon", "v", "x0"])
def test_every_target_converts_to_every_other(source):
  process = gaussian("cosine", source)
  x0, noise = x0_and_noise(2)
  # Away from the ends, where x0 from ε (÷ sqrt(ᾱ) → 0 at T) or ε from x0 (÷ sqrt(1-ᾱ)
  # → 0 at 0) is ill-conditioned; those ends are covered by the inversion tests above.
  t = jnp.asarray([50, 300, 600, 900])
  x_t = process.add_noise(x0, noise, t)
  x0_hat, eps_hat = process.predict_x0_eps(process.target(x0, noise, t), x_t, t)
  for other in ("epsilon", "v", "x0"):
    converted = process.prediction_from_x0_eps(x0_hat, eps_hat, t, prediction=other)
    expected = gaussian("cosine", other).target(x0, noise, t)
    err = rel_err(converted, expected)
    assert err <= 1e-5, (source, other, err)


@pytest.mark.parametrize("weighting", ["snr", "min_snr"])
@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_loss_weightings_are_stated_on_the_x0_error(weighting, prediction):
  """Whatever the target, the weighted loss equals w(SNR)·mean|x0 - x̂0|² with
  w = SNR ("snr") or min(SNR, γ) ("min_snr"), x̂0 converted from the model output."""
  beta_start, beta_end = BETA_RANGE["linear"]
  process = build_process(ml_collections.ConfigDict(dict(
      process="gaussian", beta_schedule="linear", num_timesteps=T, beta_start=beta_start,
      beta_end=beta_end, prediction=prediction, loss_weighting=weighting, snr_gamma=5.0)))
  x0, _ = x0_and_noise(3, (64, 4, 4, 2))  # 64 times: ~9 % of them have SNR > γ = 5
  seen = {}

  def model_fn(x_t, model_time):
    seen["x_t"], seen["t"] = x_t, model_time.astype(jnp.int32)
    return 0.3 * x_t + 0.1

  loss, _ = process.loss(model_fn, x0, jax.random.PRNGKey(5))
  x_t, t = seen["x_t"], seen["t"]
  x0_hat, _ = process.predict_x0_eps(0.3 * x_t + 0.1, x_t, t)
  snr = np.asarray(process.snr(t), np.float64)
  w = snr if weighting == "snr" else np.minimum(snr, 5.0)
  expected = w * np.asarray(mean_flat((x0_hat - x0) ** 2), np.float64)
  assert snr.min() < 5.0 < snr.max()  # both sides of γ are exercised
  np.testing.assert_allclose(loss, expected, rtol=2e-3)  # x̂0 from ε divides by sqrt(ᾱ)


def test_min_snr_is_finite_at_zero_terminal_snr():
  from ldm_jax.diffusion import schedules
  betas = schedules.rescale_zero_terminal_snr(schedules.make_betas("linear", 100))
  snr0 = None
  for prediction, at_zero in (("v", 0.0), ("x0", 0.0)):
    process = GaussianDiffusion(betas=betas, prediction=prediction, loss_weighting="min_snr",
                                zero_terminal_snr=True)
    snr0 = float(process.snr(0))
    weight = np.asarray(process._target_weight(jnp.asarray([99, 0]), jnp.zeros((2, 1)))).ravel()
    expected_0 = 5.0 / (snr0 + 1.0) if prediction == "v" else 5.0
    np.testing.assert_allclose(weight, [at_zero, expected_0], rtol=1e-6)
  assert snr0 > 5.0
  # From a training config, ε-prediction at zero terminal SNR (x0 = (x_T - ε)/0) is
  # refused (the bad_process_options case); diffusers configs may pair them (Euler clamps).


# -- rectified-flow time densities and the resolution shift (SD3) ----------------------
def test_mode_and_cosmap_times_follow_their_maps():
  n = 200_000
  key = jax.random.PRNGKey(2)
  u = np.asarray(jax.random.uniform(key, (n,)), np.float64)
  for scale in (-1.0, 0.0, 1.29):
    flow = RectifiedFlow(time_sampling="mode", mode_scale=scale)
    t = np.asarray(flow.sample_time(key, n), np.float64)
    expected = 1 - u - scale * (np.cos(np.pi / 2 * u) ** 2 - 1 + u)
    np.testing.assert_allclose(t, expected, atol=2e-6)
    assert t.min() >= 0 and t.max() <= 1
  # s = 0 is uniform; s > 0 puts more mass at mid times (SD3 Fig. 11).
  t_heavy = np.asarray(RectifiedFlow(time_sampling="mode", mode_scale=1.29).sample_time(key, n))
  mid = lambda t: np.mean(np.abs(t - 0.5) < 0.1)
  assert mid(t_heavy) > mid(u) + 0.05
  # CosMap: the density π(t) = 2 / (π - 2πt + 2πt²) (SD3 eq. 21): compare the CDF.
  t_cos = np.sort(np.asarray(RectifiedFlow(time_sampling="cosmap").sample_time(key, n),
                             np.float64))
  grid = np.linspace(0.01, 0.99, 99)
  density = lambda x: 2 / (np.pi - 2 * np.pi * x + 2 * np.pi * x * x)
  fine = np.linspace(0, 1, 200_001)
  cdf = np.interp(grid, fine, np.concatenate([[0], np.cumsum(density(fine[1:]) * np.diff(fine))]))
  empirical = np.searchsorted(t_cos, grid) / n
  assert np.abs(empirical - cdf).max() < 4 / np.sqrt(n) + 1e-3


def test_resolution_dependent_shift():
  from ldm_jax.diffusion.flow import resolution_shift
  cfg = lambda **kw: ml_collections.ConfigDict(dict(process="flow", **kw))
  # α = sqrt(m / n) for pixel counts m, n: 1024² against 256² gives 4.
  assert resolution_shift(cfg(shift_base_resolution=256), 1024) == 4.0
  assert build_process(cfg(shift_base_resolution=32), 64).shift == 2.0
  table = ((256, 1.0), (512, 1.7), (1024, 3.0))
  assert build_process(cfg(shift_by_resolution=table, shift=9.0), 512).shift == 1.7
  assert build_process(cfg(shift=3.0), 512).shift == 3.0
  with pytest.raises(UserError, match="no entry in diffusion.shift_by_resolution"):
    build_process(cfg(shift_by_resolution=table), 384)
  with pytest.raises(UserError, match="need the image size"):
    build_process(cfg(shift_base_resolution=256))


@pytest.mark.parametrize("bad,match", [
    (dict(process="flow", prediction="v"), "does not apply to rectified flow"),
    (dict(process="flow", prediction="epsilon"), "does not apply to rectified flow"),
    (dict(process="flow", variance_type="learned_range"), "is for the gaussian process"),
    (dict(process="flow", loss_weighting="min_snr"), "is for the gaussian process"),
    (dict(process="flow", time_sampling="lognormal"), "unknown diffusion.time_sampling"),
    (dict(process="flow", time_sampling="mode", mode_scale=2.0), "not monotone"),
    (dict(process="gaussian", beta_schedule="linear", num_timesteps=10, shift=3.0),
     "are for rectified flow"),
    (dict(process="gaussian", beta_schedule="linear", num_timesteps=10,
          prediction="velocity"), "unknown diffusion.prediction"),
    (dict(process="gaussian", beta_schedule="quadratic", num_timesteps=10), "unknown beta"),
    (dict(process="gaussian", beta_schedule="linear", num_timesteps=10,
          time_sampling="cosmap"), "is for rectified flow"),
    (dict(process="gaussian", beta_schedule="linear", num_timesteps=10,
          rescale_zero_snr=True), "prediction='v' or 'x0'"),
    (dict(process="gaussian", beta_schedule="linear", num_timesteps=10,
          variance_type="learned_large"), "unknown diffusion.variance_type"),
    (dict(process="gaussian", beta_schedule="linear", num_timesteps=10,
          loss_weighting="p2"), "unknown diffusion.loss_weighting"),
])
def test_bad_process_options_fail_clearly(bad, match):
  with pytest.raises(UserError, match=match):
    build_process(ml_collections.ConfigDict(bad), 28)
