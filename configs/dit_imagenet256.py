"""DiT-XL/2 on ImageNet 256² (32×32×4 SD-VAE latents), as the DiT paper trains it.

Peebles & Xie 2023, §4 and Table 4: DiT-XL/2, global batch 256, AdamW at a constant
1e-4 with no weight decay and no warm-up, EMA 0.9999; the Gaussian process of ADM
(linear β from 1e-4 to 0.02, T = 1000, ε-prediction) with a learned Σ
(variance_type learned_range, L_simple + 0.001·L_vlb); class dropout 0.1 for
classifier-free guidance.

Training on real ImageNet latents comes in a later issue: `data.folder` is an empty
placeholder and no latent dataset ships with the library, so today this config is
for ahead-of-time compilation (memory and FLOPs of the real step on a TPU topology):

  python -m ldm_jax.aot --config=configs/dit_imagenet256.py --topology=v5p-8
  python -m ldm_jax.aot --config=configs/dit_imagenet256.py --topology=v5p-8 \
      --config.mesh.shape="(1,4,1)"      # fully-sharded data parallel over 4 chips
  python -m ldm_jax.aot --config=configs/dit_imagenet256.py:tiny --topology=v5p-8 \
      --platform=cpu                     # no libtpu: the CPU compiler's rough figures

Presets (`--config=configs/dit_imagenet256.py:NAME`):
  (default)  DiT-XL/2 (675 M parameters), batch 256.
  tiny       DiT-tiny/2 on the same 32×32×4 latents and 1000 classes, batch 8:
             seconds to compile on a CPU; used by the tests.

Every section and key is the quickstart's (loaded by path), including its mesh
rules; only values change here.
"""

import ml_collections

from ldm_jax.errors import UserError
from ldm_jax.run_config import load_sibling_config

PRESETS = ("", "tiny")


def _quickstart_config(preset: str):
  """configs/quickstart.py's preset, loaded by path (this file may be given by any path)."""
  return load_sibling_config(__file__, "quickstart.py", preset)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = (arg or "").strip()
  if preset not in PRESETS:
    raise UserError(f"unknown preset {preset!r} for configs/dit_imagenet256.py; "
                    f"valid: {[p for p in PRESETS if p]} or none")
  tiny = preset == "tiny"
  config = _quickstart_config("tiny" if tiny else "")
  config.num_train_steps = 400_000   # the paper's ablation length (Table 4)
  config.log_every_steps = 100

  data = config.data
  data.source = "folder"       # ImageNet latents: a later issue (see the docstring)
  data.folder = ""             # placeholder: root/<class>/* of 32×32×4 latents
  data.image_size = 32         # 256² images / SD-VAE factor 8
  data.channels = 4
  data.num_classes = 1000
  data.batch_size = 8 if tiny else 256

  model = config.model
  model.name = "dit"
  model.variant = "DiT-tiny/2" if tiny else "DiT-XL/2"
  model.class_dropout_prob = 0.1
  model.class_conditional = True
  model.learn_sigma = True

  diffusion = config.diffusion
  diffusion.process = "gaussian"
  diffusion.prediction = "epsilon"
  diffusion.num_timesteps = 1000
  diffusion.beta_schedule = "linear"
  diffusion.beta_start = 1e-4
  diffusion.beta_end = 0.02
  diffusion.variance_type = "learned_range"
  diffusion.vlb_weight = 0.001
  diffusion.loss_weighting = "simple"

  optim = config.optim
  optim.learning_rate = 1e-4
  optim.schedule = "constant"
  optim.warmup_steps = 0
  optim.b1 = 0.9
  optim.b2 = 0.999
  optim.eps = 1e-8
  optim.weight_decay = 0.0
  optim.grad_clip = 0.0        # the official training loop does not clip
  optim.ema_decay = 0.9999
  optim.ema_warmup = False

  # Axes and shape as the quickstart's mesh ((-1, 1, 1): data parallel over every
  # device); its rules map DiT's logical axes (do not redefine them here).
  config.mesh.axes = ("data", "fsdp", "tensor")
  config.mesh.shape = (-1, 1, 1)

  config.ckpt.every_steps = 10_000
  config.eval.grid_per_class = 1

  sample = config.sample
  sample.sampler = "ddpm"      # with the learned Σ, 250 respaced steps (DiT's FID setting)
  sample.respacing = "250"
  sample.guidance_scale = 1.5
  sample.num = 50_000
  sample.batch_size = 250
  sample.judge = False         # the built-in judge knows only MNIST
  if tiny:
    config.num_train_steps = 4
    config.log_every_steps = 2
    config.ckpt.every_steps = 2
    sample.respacing = ""
    sample.num = 8
    sample.batch_size = 8
  return config
