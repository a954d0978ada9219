"""Classifier guidance (Dhariwal & Nichol 2021) on the built-in MNIST-5k.

Two runs that share one Gaussian process (built by `diffusion_config`, so the
denoiser and the classifier cannot disagree on it):

  # 1. an unconditional compact-U-Net denoiser (ε-prediction, linear β, 1000 steps)
  python -m ldm_jax.main --config=configs/classifier_guidance.py --workdir=runs/cg_denoiser
  # 2. a time-conditional classifier of noisy images x_t, trained on the same process
  python -m ldm_jax.main --config=configs/classifier_guidance.py:classifier \
      --workdir=runs/cg_classifier
  # 3. guided sampling (DDPM, 100 respaced steps) and the judge's accuracy vs the
  #    requested digit
  python -m ldm_jax.main --config=configs/classifier_guidance.py --workdir=runs/cg_denoiser \
      --mode=sample --config.sample.classifier_workdir=runs/cg_classifier \
      --config.sample.classifier_scale=8

Presets (`--config=configs/classifier_guidance.py:NAME`):
  (default) or unconditional   the unconditional denoiser
  classifier                   the noisy classifier (config.task = "classify")
  tiny, tiny-classifier        seconds-long versions used by the tests
"""

import ml_collections

from ldm_jax.errors import UserError
from ldm_jax.run_config import load_sibling_config

PRESETS = ("", "unconditional", "classifier", "tiny", "tiny-classifier")


def _quickstart_config(preset: str):
  """configs/quickstart.py's preset, loaded by path (this file may be given by any path)."""
  return load_sibling_config(__file__, "quickstart.py", preset)


def diffusion_config(base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The Gaussian process shared by the denoiser and the classifier: DDPM's (ε,
  linear β, T = 1000), from the quickstart's diffusion section."""
  diffusion = base.diffusion
  diffusion.process = "gaussian"
  diffusion.prediction = "epsilon"
  diffusion.beta_schedule = "linear"
  diffusion.num_timesteps = 1000
  return diffusion


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = (arg or "").strip()
  if preset not in PRESETS:
    raise UserError(f"unknown preset {preset!r} for configs/classifier_guidance.py; "
                    f"valid: {[p for p in PRESETS if p]} or none")
  classify = preset in ("classifier", "tiny-classifier")
  tiny = preset.startswith("tiny")
  # The quickstart's data (MNIST-5k), optimizer, mesh and checkpointing.
  config = _quickstart_config("tiny" if tiny else "")
  config.task = "classify" if classify else "denoise"   # denoise | classify
  config.diffusion = diffusion_config(config)

  model = config.model
  if classify:
    model.name = "noisy_classifier"
    model.variant = "tiny" if tiny else "mnist"
  else:
    model.class_conditional = False    # unconditional: labels are never seen
    model.class_dropout_prob = 0.0

  # task=classify: held-out accuracy at these timesteps instead of sample grids.
  config.eval.classifier_timesteps = (0, 999) if tiny else (0, 250, 500, 750, 999)

  sample = config.sample
  sample.num = 10 if tiny else 500
  # DDPM on 100 respaced steps: at s = 8, 91.2 % of samples are the requested digit
  # with Fréchet distance 37.5 (BUILD_NOTES).
  sample.sampler = "ddim" if tiny else "ddpm"  # classifier guidance: ddpm | ddim
  sample.respacing = "" if tiny else "100"     # guided-diffusion respacing
  sample.guidance_scale = 1.0          # classifier-free guidance: off (unconditional)
  sample.classifier_workdir = ""       # a task=classify run on the same process
  sample.classifier_scale = 8.0        # s in s·∇ log p(y | x_t) (with a classifier_workdir)
  sample.classifier_use_ema = True

  if classify and not tiny:
    config.num_train_steps = 2000
    config.data.batch_size = 64
  return config
