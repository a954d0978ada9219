"""`from_diffusers_scheduler`: realistic scheduler_config.json dicts round-tripped.

Each config builds our process + sampler and, through `SchedulerClass.from_config`, the
diffusers scheduler; both loops run the same deterministic model from the same noise
(diffusers: x_T·init_noise_sigma, `scale_model_input`, `step`; its `randn_tensor`
patched to our per-step draws `normal(fold_in(key, i))`) and must agree to 1e-5
relative over the whole trajectory. diffusers runs NCHW, ours NHWC (the model is
elementwise; see test_samplers.py).
"""

import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.schedulers import scheduling_ddpm, scheduling_dpmsolver_multistep

from ldm_jax.diffusion import SchedulerSetup, from_diffusers_scheduler
from ldm_jax.diffusion.flow import RectifiedFlow
from ldm_jax.diffusion.gaussian import GaussianDiffusion
from ldm_jax.errors import UserError
from tests.sampler_models import model_jax, model_torch

SHAPE = (2, 8, 8, 3)
TOL = 1e-5

SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            num_train_timesteps=1000, trained_betas=None, _diffusers_version="0.6.0")
CONFIGS = {
    # Stable Diffusion 1.5 with its PNDM swapped for DDIM / Euler / DPM-Solver++ (2M Karras)
    "sd15_ddim": dict(SD15, _class_name="DDIMScheduler", clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1),
    "sd15_euler": dict(SD15, _class_name="EulerDiscreteScheduler", steps_offset=1,
                       timestep_spacing="leading", interpolation_type="linear",
                       prediction_type="epsilon", use_karras_sigmas=False),
    "sd15_dpmpp_2m_karras": dict(SD15, _class_name="DPMSolverMultistepScheduler",
                                 algorithm_type="dpmsolver++", solver_order=2,
                                 solver_type="midpoint", lower_order_final=True,
                                 use_karras_sigmas=True, steps_offset=1,
                                 timestep_spacing="leading"),
    "sd15_heun_karras": dict(SD15, _class_name="HeunDiscreteScheduler", use_karras_sigmas=True,
                             steps_offset=1, timestep_spacing="trailing"),
    # Stable Diffusion 2.1 (768, v-prediction): its scheduler_config.json carries PNDM's
    # skip_prk_steps, which DDIMScheduler does not define (strict=False ignores it)
    "sd21_v": dict(SD15, _class_name="DDIMScheduler", clip_sample=False,
                   prediction_type="v_prediction", set_alpha_to_one=False, skip_prk_steps=True,
                   steps_offset=1),
    # SDXL base (EulerDiscreteScheduler with leftover DDIM / PNDM keys)
    "sdxl_euler": dict(SD15, _class_name="EulerDiscreteScheduler", clip_sample=False,
                       interpolation_type="linear", prediction_type="epsilon",
                       sample_max_value=1.0, set_alpha_to_one=False, skip_prk_steps=True,
                       steps_offset=1, timestep_spacing="leading", use_karras_sigmas=False),
    # DiT (ADM): DDPM with a learned-range variance read from the extra channels
    "dit_ddpm": dict(_class_name="DDPMScheduler", beta_schedule="linear", beta_start=0.0001,
                     beta_end=0.02, num_train_timesteps=1000, clip_sample=False,
                     variance_type="learned_range", timestep_spacing="leading"),
    # DeepFloyd IF stage I: cosine β, dynamic thresholding, learned range
    "if_ddpm": dict(_class_name="DDPMScheduler", beta_schedule="squaredcos_cap_v2",
                    beta_start=0.0001, beta_end=0.02, clip_sample=True, clip_sample_range=1.0,
                    dynamic_thresholding_ratio=0.95, num_train_timesteps=1000,
                    prediction_type="epsilon", sample_max_value=1.5, thresholding=True,
                    variance_type="learned_range"),
    # zero terminal SNR + trailing + v (Lin et al.)
    "ztsnr_ddim": dict(SD15, _class_name="DDIMScheduler", clip_sample=False,
                       prediction_type="v_prediction", rescale_betas_zero_snr=True,
                       timestep_spacing="trailing", set_alpha_to_one=False),
    # a bare Heun config: diffusers' Heun β range defaults to 0.00085 .. 0.012 (regression)
    "heun_bare": dict(_class_name="HeunDiscreteScheduler"),
    # SANA: DPM-Solver++ in flow-matching mode (flow sigmas, velocity prediction)
    "sana_dpm": dict(_class_name="DPMSolverMultistepScheduler", algorithm_type="dpmsolver++",
                     beta_end=0.02, beta_schedule="linear", beta_start=0.0001,
                     dynamic_thresholding_ratio=0.995, euler_at_final=False,
                     final_sigmas_type="zero", flow_shift=3.0, lambda_min_clipped=-float("inf"),
                     lower_order_final=True, num_train_timesteps=1000,
                     prediction_type="flow_prediction", sample_max_value=1.0, solver_order=2,
                     solver_type="midpoint", steps_offset=0, thresholding=False,
                     timestep_spacing="linspace", trained_betas=None, use_beta_sigmas=False,
                     use_exponential_sigmas=False, use_flow_sigmas=True,
                     use_karras_sigmas=False, use_lu_lambdas=False, variance_type=None),
    "flow_dpm_sde_dynamic": dict(_class_name="DPMSolverMultistepScheduler",
                                 algorithm_type="sde-dpmsolver++", solver_order=3,
                                 prediction_type="flow_prediction", use_flow_sigmas=True,
                                 use_dynamic_shifting=True, num_train_timesteps=500),
    # SD3 medium / SD3.5 large
    "sd3": dict(_class_name="FlowMatchEulerDiscreteScheduler", _diffusers_version="0.29.0",
                num_train_timesteps=1000, shift=3.0),
    "sd35": dict(_class_name="FlowMatchEulerDiscreteScheduler", base_image_seq_len=256,
                 base_shift=0.5, invert_sigmas=False, max_image_seq_len=4096, max_shift=1.15,
                 num_train_timesteps=1000, shift=3.0, shift_terminal=None,
                 use_beta_sigmas=False, use_dynamic_shifting=False,
                 use_exponential_sigmas=False, use_karras_sigmas=False),
    # Flux-like dynamic shifting (mu passed to set_timesteps)
    "flux": dict(_class_name="FlowMatchEulerDiscreteScheduler", base_image_seq_len=256,
                 base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                 num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True),
}
FOREIGN = {"sd21_v": ["skip_prk_steps"],
           "sdxl_euler": ["clip_sample", "sample_max_value", "set_alpha_to_one",
                          "skip_prk_steps"]}
LEARNED = ("dit_ddpm", "if_ddpm")


def model2_jax(x, t):
  return jnp.concatenate([model_jax(x, t), x / (1.0 + x * x)], axis=-1)


def model2_torch(x, t):
  return torch.cat([model_torch(x, t), x / (1.0 + x * x)], dim=1)


def to_torch(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def diffusers_loop(scheduler, x, noises, model, monkeypatch, **set_timesteps):
  """The standard diffusers pipeline loop from standard-normal x."""
  state = {"step": 0}
  for module in (scheduling_ddpm, scheduling_dpmsolver_multistep):
    monkeypatch.setattr(module, "randn_tensor",
                        lambda shape, **kw: to_torch(noises[state["step"]]))
  sample = to_torch(x) * getattr(scheduler, "init_noise_sigma", 1.0)  # flow: none
  scale = getattr(scheduler, "scale_model_input", lambda sample, t: sample)
  with torch.no_grad():
    for i, t in enumerate(scheduler.timesteps):
      state["step"] = min(i, len(noises) - 1)
      out = model(scale(sample, t), t)
      sample = scheduler.step(out, t, sample).prev_sample
  return sample.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip(monkeypatch, name):
  cfg = CONFIGS[name]
  steps = 8
  setup = from_diffusers_scheduler(cfg, strict=name not in FOREIGN)
  assert isinstance(setup, SchedulerSetup) and setup.ignored == tuple(FOREIGN.get(name, ()))
  process, sampler = setup
  flow = "Flow" in cfg["_class_name"] or cfg.get("use_flow_sigmas")
  assert isinstance(process, RectifiedFlow if flow else GaussianDiffusion)
  call = {}
  if cfg.get("use_dynamic_shifting"):
    call["mu"] = 0.5 + (1.15 - 0.5) / (4096 - 256) * (1024 - 256)  # image_seq_len 1024
  ref = getattr(diffusers, cfg["_class_name"]).from_config(cfg)
  ref.set_timesteps(steps, **call)

  key = jax.random.key(5, impl="rbg")
  x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
  noises = np.asarray(jax.lax.map(
      lambda i: jax.random.normal(jax.random.fold_in(key, i), SHAPE), jnp.arange(steps)))
  ours = jax.jit(sampler(steps, **call), static_argnums=0)(
      model2_jax if name in LEARNED else model_jax, jnp.asarray(x), key)
  theirs = diffusers_loop(ref, x, noises, model2_torch if name in LEARNED else model_torch,
                          monkeypatch)
  assert np.all(np.isfinite(theirs))
  err = float(np.abs(np.asarray(ours, np.float64) - theirs).max() / np.abs(theirs).max())
  print(f"[parity] from_diffusers_scheduler {name} ({setup.name}): max rel err {err:.3g}")
  assert err <= TOL, f"{name}: {err:.3g}"


def test_paths_and_options(tmp_path):
  cfg = CONFIGS["sd15_ddim"]
  folder = tmp_path / "model"
  (folder / "scheduler").mkdir(parents=True)
  (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
  from_folder = from_diffusers_scheduler(str(folder))
  from_file = from_diffusers_scheduler(folder / "scheduler" / "scheduler_config.json")
  from_dict = from_diffusers_scheduler(cfg)
  for setup in (from_folder, from_file):
    assert setup.name == from_dict.name == "ddim"
    assert dict(setup.options) == dict(from_dict.options) == dict(
        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    np.testing.assert_array_equal(setup.process.betas, from_dict.process.betas)
  # call-time overrides: a step argument (eta) and set_timesteps' own
  assert from_dict.sampler(10, eta=0.5).timesteps.tolist() == list(range(901, 0, -100))
  flux = from_diffusers_scheduler(CONFIGS["flux"])
  a = flux.sampler(4, mu=0.8).sigmas
  b = flux.sampler(4, image_seq_len=4096).sigmas
  assert a.shape == (5,) and b[1] > a[1]  # more tokens, more shift
  with pytest.raises(AttributeError):
    from_dict.name = "ddpm"  # frozen


@pytest.mark.parametrize("cfg,strict,message", [
    (dict(_class_name="PNDMScheduler"), True, r"_class_name='PNDMScheduler'.*valid"),
    (dict(beta_schedule="linear"), True, "_class_name=None"),
    (dict(_class_name="DDIMScheduler", skip_prk_steps=True), True,
     r"DDIMScheduler has no option\(s\) \['skip_prk_steps'\].*strict=False"),
    (dict(_class_name="DDIMScheduler", beta_schedule="sigmoid"), False,
     r"beta_schedule='sigmoid' is not supported; valid: \['linear', 'scaled_linear', "
     r"'squaredcos_cap_v2'\]"),
    (dict(_class_name="DPMSolverMultistepScheduler", prediction_type="flow_prediction"), True,
     "prediction_type='flow_prediction' with use_flow_sigmas=False is not supported"),
    (dict(_class_name="DPMSolverMultistepScheduler", use_flow_sigmas=True), True,
     "prediction_type='epsilon' with use_flow_sigmas=True is not supported"),
    (dict(_class_name="DPMSolverMultistepScheduler", use_flow_sigmas=True,
          prediction_type="flow_prediction", use_karras_sigmas=True), True,
     r"\['use_karras_sigmas'\] cannot be combined with use_flow_sigmas"),
    (dict(_class_name="EDMEulerScheduler"), True,
     r"_class_name='EDMEulerScheduler' is not supported; valid: \['DDPMScheduler'"),
    (dict(_class_name="DDPMScheduler", variance_type="huge"), True, "variance_type='huge'"),
    (dict(_class_name="DDPMScheduler", timestep_spacing="karras"), True,
     "timestep_spacing='karras'"),
    (dict(_class_name="DDPMScheduler", trained_betas=[0.1, 0.2], num_train_timesteps=3), True,
     r"trained_betas has shape \(2,\)"),
    (dict(_class_name="FlowMatchEulerDiscreteScheduler", use_karras_sigmas=True,
          use_beta_sigmas=True), True, "only one of"),
    (dict(_class_name="FlowMatchEulerDiscreteScheduler", time_shift_type="cubic"), True,
     "time_shift_type='cubic'"),
    (dict(_class_name="FlowMatchEulerDiscreteScheduler", beta_schedule="linear"), True,
     r"has no option\(s\) \['beta_schedule'\]"),
    (dict(_class_name="EulerDiscreteScheduler", interpolation_type="cubic"), True,
     "interpolation_type='cubic'"),
])
def test_errors(cfg, strict, message):
  with pytest.raises(UserError, match=message):
    from_diffusers_scheduler(cfg, strict=strict)


def test_path_errors(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    from_diffusers_scheduler(tmp_path / "missing.json")
  with pytest.raises(UserError, match="no scheduler config"):
    from_diffusers_scheduler(tmp_path)
  bad = tmp_path / "scheduler_config.json"
  bad.write_text("{not json")
  with pytest.raises(UserError, match="cannot read"):
    from_diffusers_scheduler(bad)
  with pytest.raises(UserError, match="takes a dict or a path"):
    from_diffusers_scheduler(42)


def test_foreign_keys_are_ignored_by_default():
  """As diffusers' from_config: keys the class does not define (leftovers in released
  model folders) are skipped and listed in `.ignored`; strict=True rejects them."""
  setup = from_diffusers_scheduler(CONFIGS["sdxl_euler"])
  assert setup.ignored == tuple(FOREIGN["sdxl_euler"])
  with pytest.raises(UserError, match="strict=False"):
    from_diffusers_scheduler(CONFIGS["sdxl_euler"], strict=True)


def test_heun_betas_are_diffusers_own():
  """Regression: HeunDiscreteScheduler's beta_start / beta_end default to 0.00085 / 0.012
  (not the 0.0001 / 0.02 of the other classes), and it has no rescale_betas_zero_snr
  (diffusers ignores the key; it was applied)."""
  for cfg, ignored in [(dict(_class_name="HeunDiscreteScheduler"), ()),
                       (dict(_class_name="HeunDiscreteScheduler", beta_schedule="scaled_linear",
                             num_train_timesteps=50, rescale_betas_zero_snr=True),
                        ("rescale_betas_zero_snr",))]:
    setup = from_diffusers_scheduler(cfg)
    assert setup.ignored == ignored and not getattr(setup.process, "zero_terminal_snr", False)
    ref = diffusers.HeunDiscreteScheduler.from_config(cfg)
    np.testing.assert_array_equal(np.asarray(setup.process.betas), ref.betas.numpy())


def test_defaults_are_accepted():
  """A config listing every key at diffusers' default (as `save_config` writes it) loads
  for each class, and trained_betas wins over beta_schedule as in diffusers."""
  for cls in ("DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
              "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
              "FlowMatchEulerDiscreteScheduler"):
    full = dict(getattr(diffusers, cls)().config)
    full["_class_name"] = cls
    setup = from_diffusers_scheduler(full)
    assert setup.ignored == ()
  betas = np.linspace(1e-4, 0.02, 50).tolist()
  setup = from_diffusers_scheduler(dict(_class_name="DDPMScheduler", trained_betas=betas,
                                        num_train_timesteps=50, beta_schedule="sigmoid"))
  np.testing.assert_array_equal(setup.process.betas, np.asarray(betas, np.float32))
