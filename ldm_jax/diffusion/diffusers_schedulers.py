"""A diffusers scheduler configuration -> our process and sampler.

  setup = from_diffusers_scheduler("path/to/model")      # or a scheduler_config.json,
  process, sampler = setup                                 # or the config as a dict
  sample = sampler(50)                                     # set_timesteps(50)
  x = sample(model_fn, noise, key)

Supported `_class_name`s: DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler,
HeunDiscreteScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler.
Every configuration key of these classes is understood: the keys that describe the
noising process (num_train_timesteps, beta_start, beta_end, beta_schedule,
trained_betas, prediction_type, rescale_betas_zero_snr, with each class's defaults —
HeunDiscreteScheduler's β range is 0.00085 .. 0.012; for flow matching shift and
num_train_timesteps) build the process, the others are the sampler's options (the
builders in `samplers.py` and `sigma_samplers.py` take diffusers' names). Keys starting
with "_" are ignored. A key the class does not define is ignored, as diffusers'
`from_config` ignores it (released model folders carry such leftovers: SD 2.1's
DDIMScheduler config has PNDM's `skip_prk_steps`, SDXL's EulerDiscreteScheduler DDIM's
`clip_sample` and `set_alpha_to_one`; HeunDiscreteScheduler has no
`rescale_betas_zero_snr`); such keys are listed in `.ignored`, and strict=True makes
them an error instead. Unsupported values are errors naming the key, the value and the
valid ones.

A DPMSolverMultistepScheduler with prediction_type="flow_prediction" and
use_flow_sigmas=True (SANA) is flow matching: its process is a RectifiedFlow with
shift=flow_shift (its β keys then have no effect) and `mu` is a set_timesteps argument.
"""

import dataclasses
import json
import os
import types

import numpy as np

from ldm_jax.diffusion import samplers
from ldm_jax.diffusion import schedules
from ldm_jax.diffusion.flow import RectifiedFlow
from ldm_jax.diffusion.gaussian import GaussianDiffusion
from ldm_jax.errors import UserError, check

GAUSSIAN_PROCESS_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                         "trained_betas", "prediction_type", "rescale_betas_zero_snr")
# HeunDiscreteScheduler has no rescale_betas_zero_snr (diffusers ignores the key there).
HEUN_PROCESS_KEYS = tuple(k for k in GAUSSIAN_PROCESS_KEYS if k != "rescale_betas_zero_snr")
# diffusers' (beta_start, beta_end) defaults: Heun's differ from the others'.
BETA_RANGE_DEFAULTS = {"HeunDiscreteScheduler": (0.00085, 0.012)}
DEFAULT_BETA_RANGE = (0.0001, 0.02)
PREDICTION_TYPES = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}
# diffusers' beta_schedule name -> ours, per class (the names each class accepts).
_COMMON_BETAS = {"linear": "linear", "scaled_linear": "scaled_linear",
                 "squaredcos_cap_v2": "cosine"}
BETA_SCHEDULES = {
    "DDPMScheduler": dict(_COMMON_BETAS, sigmoid="sigmoid", laplace="laplace"),
    "DDIMScheduler": _COMMON_BETAS,
    "EulerDiscreteScheduler": _COMMON_BETAS,
    "HeunDiscreteScheduler": dict(_COMMON_BETAS, exp="exp"),
    "DPMSolverMultistepScheduler": _COMMON_BETAS,
}
# class -> (our sampler name, the builder's option table, set_timesteps / step arguments
# that are options of the builder but not configuration keys).
_GAUSSIAN_CLASSES = {
    "DDPMScheduler": ("ddpm", ("timesteps", "respacing")),
    "DDIMScheduler": ("ddim", ("eta", "use_clipped_model_output", "respacing")),
    "EulerDiscreteScheduler": ("euler", ("s_churn", "s_tmin", "s_tmax", "s_noise")),
    "HeunDiscreteScheduler": ("heun", ()),
    "DPMSolverMultistepScheduler": ("dpm_solver", ("mu",)),
}
FLOW_CLASS = "FlowMatchEulerDiscreteScheduler"
FLOW_CALL_ARGS = ("mu", "image_seq_len", "sigmas", "timesteps")
SCHEDULER_CLASSES = tuple(_GAUSSIAN_CLASSES) + (FLOW_CLASS,)


def _option_table(name: str) -> dict:
  """The builder's option defaults for our sampler `name`."""
  if name == "ddpm":
    return samplers.DDPM_OPTIONS
  if name == "ddim":
    return samplers.DDIM_OPTIONS
  if name == "flow_euler":
    return samplers.FLOW_EULER_OPTIONS
  from ldm_jax.diffusion import sigma_samplers  # pylint: disable=import-outside-toplevel
  return {"euler": sigma_samplers.EULER_OPTIONS, "heun": sigma_samplers.HEUN_OPTIONS,
          "dpm_solver": sigma_samplers.DPM_OPTIONS}[name]


def _builder(name: str):
  if name == "flow_euler":
    return samplers.flow_euler_sampler
  if name in ("ddpm", "ddim"):
    return {"ddpm": samplers.ddpm_sampler, "ddim": samplers.ddim_sampler}[name]
  from ldm_jax.diffusion import sigma_samplers  # pylint: disable=import-outside-toplevel
  return getattr(sigma_samplers, f"{name}_sampler")


@dataclasses.dataclass(frozen=True, eq=False)
class SchedulerSetup:
  """What a diffusers scheduler config describes: `.process` (GaussianDiffusion or
  RectifiedFlow), `.name` (our sampler: ddpm, ddim, euler, heun, dpm_solver,
  flow_euler), `.options` (its options, diffusers' names), `.class_name` and
  `.ignored` (keys the class does not define, skipped as diffusers does). Unpacks as (process, sampler)."""
  process: object
  name: str
  options: types.MappingProxyType
  class_name: str
  ignored: tuple = ()

  def sampler(self, num_inference_steps=None, **kwargs):
    """The sample function `(model_fn, noise, key, cond_fn=None) -> x` for
    `num_inference_steps` steps; `kwargs` are set_timesteps / step arguments (mu,
    sigmas, timesteps, eta, …) or any option to override."""
    return _builder(self.name)(self.process, num_inference_steps, **{**self.options, **kwargs})

  def __iter__(self):
    return iter((self.process, self.sampler))


def load_scheduler_config(source) -> dict:
  """A scheduler config dict from a dict, a scheduler_config.json, or a diffusers model
  folder (its scheduler/scheduler_config.json)."""
  if isinstance(source, dict):
    return dict(source)
  check(isinstance(source, (str, os.PathLike)),
        f"from_diffusers_scheduler takes a dict or a path, got {type(source).__name__}")
  path = os.fspath(source)
  if os.path.isdir(path):
    candidates = [os.path.join(path, "scheduler", "scheduler_config.json"),
                  os.path.join(path, "scheduler_config.json")]
    found = [c for c in candidates if os.path.isfile(c)]
    check(bool(found), f"no scheduler config in {path!r}: looked for {candidates}")
    path = found[0]
  check(os.path.isfile(path), f"scheduler config {path!r} does not exist")
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read the scheduler config {path!r}: {e}") from e
  check(isinstance(config, dict), f"scheduler config {path!r} is not a JSON object")
  return config


def _gaussian_process(class_name: str, cfg: dict) -> GaussianDiffusion:
  num = cfg.get("num_train_timesteps", 1000)
  check(isinstance(num, int) and num >= 1,
        f"{class_name}: num_train_timesteps={num!r} must be an int >= 1")
  prediction = cfg.get("prediction_type", "epsilon")
  check(prediction in PREDICTION_TYPES,
        f"{class_name}: prediction_type={prediction!r} is not supported; valid: "
        f"{list(PREDICTION_TYPES)}")
  trained = cfg.get("trained_betas")
  if trained is not None:
    betas = np.asarray(trained, np.float32)
    check(betas.ndim == 1 and len(betas) == num,
          f"{class_name}: trained_betas has shape {betas.shape}, expected ({num},) "
          f"(num_train_timesteps)")
  else:
    valid = BETA_SCHEDULES[class_name]
    schedule = cfg.get("beta_schedule", "linear")
    check(schedule in valid, f"{class_name}: beta_schedule={schedule!r} is not supported; "
                             f"valid: {list(valid)}")
    start, end = BETA_RANGE_DEFAULTS.get(class_name, DEFAULT_BETA_RANGE)
    betas = schedules.make_betas(valid[schedule], num, cfg.get("beta_start", start),
                                 cfg.get("beta_end", end))
  zero_snr = bool(cfg.get("rescale_betas_zero_snr", False))
  if zero_snr:
    betas = schedules.rescale_zero_terminal_snr(betas)
  kwargs = dict(betas=betas, prediction=PREDICTION_TYPES[prediction])
  if class_name == "DDPMScheduler" and cfg.get("variance_type") == "learned_range":
    kwargs["variance_type"] = "learned_range"  # the model's extra channels
  if zero_snr:
    kwargs["zero_terminal_snr"] = True
  return GaussianDiffusion(**kwargs)


def _dpm_flow_process(cfg: dict) -> RectifiedFlow:
  """The flow process of a DPMSolverMultistepScheduler in flow-matching mode
  (prediction_type="flow_prediction" with use_flow_sigmas=True, as SANA ships it); its
  β keys then have no effect. Either key without the other mixes the two
  parametrisations (flow velocity on the β schedule's σ, or ε / v on flow σ), which no
  model is trained for: an error."""
  name = "DPMSolverMultistepScheduler"
  check(cfg.get("prediction_type") == "flow_prediction" and bool(cfg.get("use_flow_sigmas")),
        f"{name}: prediction_type={cfg.get('prediction_type', 'epsilon')!r} with "
        f"use_flow_sigmas={cfg.get('use_flow_sigmas', False)!r} is not supported: flow "
        "matching needs prediction_type='flow_prediction' and use_flow_sigmas=True, "
        f"diffusion prediction_type in {list(PREDICTION_TYPES)} and use_flow_sigmas=False")
  return _flow_process(name, cfg, "flow_shift")


def _flow_process(name: str, cfg: dict, shift_key: str) -> RectifiedFlow:
  """RectifiedFlow from a config's num_train_timesteps and its shift (`shift_key`)."""
  num = cfg.get("num_train_timesteps", 1000)
  check(isinstance(num, int) and num >= 1,
        f"{name}: num_train_timesteps={num!r} must be an int >= 1")
  shift = cfg.get(shift_key, 1.0)
  check(isinstance(shift, (int, float)) and shift > 0,
        f"{name}: {shift_key}={shift!r} must be a number > 0")
  return RectifiedFlow(shift=float(shift), num_train_timesteps=num)


def from_diffusers_scheduler(source, strict: bool = False) -> SchedulerSetup:
  """Our process and sampler for a diffusers scheduler config (a dict, a
  scheduler_config.json, or a model folder); see the module docstring."""
  cfg = load_scheduler_config(source)
  class_name = cfg.get("_class_name")
  check(class_name in SCHEDULER_CLASSES,
        f"scheduler _class_name={class_name!r} is not supported; valid: "
        f"{list(SCHEDULER_CLASSES)}")
  cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
  if class_name == FLOW_CLASS:
    name, call_args = "flow_euler", FLOW_CALL_ARGS
    process_keys = ("num_train_timesteps",)
  else:
    name, call_args = _GAUSSIAN_CLASSES[class_name]
    process_keys = HEUN_PROCESS_KEYS if name == "heun" else GAUSSIAN_PROCESS_KEYS
  table = _option_table(name)
  known = (set(table) - set(call_args)) | set(process_keys)
  foreign = sorted(set(cfg) - known)
  check(not strict or not foreign,
        f"{class_name} has no option(s) {foreign} (diffusers ignores keys of other "
        f"schedulers; strict=False does the same); valid: {sorted(known)}")
  cfg = {k: v for k, v in cfg.items() if k in known}
  options = {k: v for k, v in cfg.items() if k in table}
  if class_name == "DPMSolverMultistepScheduler" and (
      cfg.get("prediction_type") == "flow_prediction" or cfg.get("use_flow_sigmas")):
    process = _dpm_flow_process(cfg)
  elif class_name == FLOW_CLASS:
    process = _flow_process(class_name, cfg, "shift")
  else:
    process = _gaussian_process(class_name, cfg)
  setup = SchedulerSetup(process=process, name=name, options=types.MappingProxyType(options),
                         class_name=class_name, ignored=tuple(foreign))
  # Validate the options now (host-side schedule of a short run).
  probe = {}
  if class_name == FLOW_CLASS and options.get("use_dynamic_shifting"):
    probe["mu"] = 1.0
  setup.sampler(_probe_steps(process), **probe)
  return setup


def _probe_steps(process) -> int:
  if isinstance(process, GaussianDiffusion):
    return min(2, process.num_timesteps)
  return 2
