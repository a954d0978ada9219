"""Class-conditional diffusion on the built-in MNIST-5k, sized for a 2-core CPU.

  python -m ldm_jax.main --config=configs/quickstart.py --workdir=runs/quickstart
  python -m ldm_jax.main --config=configs/quickstart.py --workdir=runs/quickstart --mode=sample

Presets (`--config=configs/quickstart.py:NAME`):
  (default)  compact pixel U-Net (0.86 M params) trained as rectified flow with
             logit-normal times, 1,900 steps of batch 32 (about 7 minutes on a
             2-core CPU); 20-step Euler sampling with classifier-free guidance.
  dit        DiT-mnist/4 (patch 4: 49 tokens) in the same loop with the same
             rectified-flow process and sampler, for the same CPU budget.
  tiny       a seconds-long smoke configuration used by the tests.
"""

import ml_collections

from ldm_jax.errors import UserError

PRESETS = ("", "dit", "tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = (arg or "").strip()
  if preset not in PRESETS:
    raise UserError(f"unknown preset {preset!r} for configs/quickstart.py; "
                    f"valid: {[p for p in PRESETS if p]} or none")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.num_train_steps = 1900
  config.log_every_steps = 100
  # Stop (with a checkpoint) after this many steps in one process; 0 = run to the end.
  # For time-limited job slots: the next launch resumes where this one stopped.
  config.max_steps_per_run = 0

  config.data = data = ml_collections.ConfigDict()
  data.source = "mnist"        # mnist | folder | tfds
  data.split = "train"         # mnist: train (4,500) | heldout (500) | all
  data.folder = ""             # source=folder: root/<class>/*.png
  data.name = ""               # source=tfds: dataset name (prepared in data_dir)
  data.data_dir = ""
  data.image_size = 28
  data.channels = 1
  data.num_classes = 10
  data.batch_size = 32
  data.worker_count = 0        # Grain worker processes (0 = in the main process)

  config.model = model = ml_collections.ConfigDict()
  model.name = "compact_unet"
  model.variant = "mnist"
  model.class_dropout_prob = 0.1

  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.process = "flow"   # flow | gaussian
  diffusion.time_sampling = "logit_normal"
  diffusion.logit_mean = 0.0
  diffusion.logit_std = 1.0
  diffusion.shift = 1.0
  diffusion.num_timesteps = 1000
  diffusion.prediction = "epsilon"      # gaussian only: epsilon | v | x0
  diffusion.beta_schedule = "linear"    # gaussian only: linear | scaled_linear | cosine
  diffusion.beta_start = 1e-4
  diffusion.beta_end = 0.02

  config.optim = optim = ml_collections.ConfigDict()
  optim.learning_rate = 2e-3
  optim.schedule = "cosine"    # constant | cosine (to 0 at num_train_steps)
  optim.warmup_steps = 100
  optim.b1 = 0.9
  optim.b2 = 0.99
  optim.eps = 1e-8
  optim.weight_decay = 0.0
  optim.grad_clip = 1.0
  optim.ema_decay = 0.999
  optim.ema_warmup = True

  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.axes = ("data", "fsdp", "tensor")
  mesh.shape = (-1, 1, 1)
  # logical axis -> mesh axis ("" = replicated).
  mesh.rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
                ("kv", ""), ("tokens", ""), ("classes", ""), ("conv_in", ""),
                ("conv_out", "tensor"), ("norm", ""))

  config.ckpt = ckpt = ml_collections.ConfigDict()
  ckpt.every_steps = 500
  ckpt.max_to_keep = 3

  config.eval = evaluation = ml_collections.ConfigDict()
  evaluation.every_steps = 0   # 0 = only at the end of training
  evaluation.grid_per_class = 10  # sample grid logged to TensorBoard

  config.sample = sample = ml_collections.ConfigDict()
  sample.num = 1000
  sample.batch_size = 250
  sample.labels = ()           # empty: balanced over classes; else the labels to cycle
  sample.sampler = "euler"     # flow: euler | gaussian: ddpm | ddim
  sample.num_steps = 20
  sample.guidance_scale = 1.5
  sample.timestep_spacing = "leading"  # gaussian: leading | trailing | linspace (diffusers)
  sample.respacing = ""        # gaussian: guided-diffusion respacing ("250", "ddim25"); wins if set
  sample.steps_offset = 0
  sample.eta = 0.0
  sample.variance = "fixed_small"
  sample.clip_x0 = 0.0         # > 0: clip predicted x0 to [-v, v] (gaussian samplers)
  sample.final_alpha_bar = 1.0
  sample.seed = 0
  sample.use_ema = True
  sample.judge = True          # built-in MNIST: classifier accuracy and Fréchet distance

  if preset == "dit":
    model.name = "dit"
    model.variant = "DiT-mnist/4"
    model.learn_sigma = False
    optim.learning_rate = 1e-3
    config.num_train_steps = 1250
  elif preset == "tiny":
    model.variant = "tiny"
    data.batch_size = 16
    config.num_train_steps = 6
    config.log_every_steps = 2
    ckpt.every_steps = 3
    evaluation.grid_per_class = 1
    optim.warmup_steps = 2
    sample.num = 10
    sample.batch_size = 8
    sample.num_steps = 3
    sample.judge = False
  return config
