"""Class-conditional diffusion on the built-in MNIST-5k, sized for a 2-core CPU.

  python -m ldm_jax.main --config=configs/quickstart.py --workdir=runs/quickstart
  python -m ldm_jax.main --config=configs/quickstart.py --workdir=runs/quickstart --mode=sample

Presets (`--config=configs/quickstart.py:NAME`):
  (default)  compact pixel U-Net (0.86 M params) trained as rectified flow with
             logit-normal times, 1,900 steps of batch 32 (about 7 minutes on a
             2-core CPU); 20-step Euler sampling with classifier-free guidance.
  dit        DiT-mnist/4 (patch 4: 49 tokens) in the same loop with the same
             rectified-flow process and sampler, for the same CPU budget.
  eps        the default with DDPM's process (ε-prediction, linear β, T = 1000) in
             place of rectified flow: same model, data, optimizer and steps.
  dit_sigma  DiT-mnist/4 with a learned variance (learn_sigma) trained with improved
             DDPM's hybrid loss L_simple + 0.001·L_vlb; DDPM sampling on a respaced
             chain with the learned Σ.
  tiny       a seconds-long smoke configuration used by the tests.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from ldm_jax.errors import UserError

PRESETS = ("", "dit", "eps", "dit_sigma", "tiny")

# Every sampler option (see ldm_jax/diffusion/samplers.py and sigma_samplers.py) and its
# type; the config holds each as an unset placeholder that the command line can set.
SAMPLE_OPTION_TYPES = {
    # timesteps (ddpm, ddim, euler, heun, dpm_solver)
    "timestep_spacing": str, "steps_offset": int, "timesteps": tuple,
    # x0 clipping / dynamic thresholding (ddpm, ddim, heun, dpm_solver)
    "clip_sample": bool, "clip_sample_range": float, "thresholding": bool,
    "dynamic_thresholding_ratio": float, "sample_max_value": float,
    # ddpm / ddim
    "variance_type": str, "set_alpha_to_one": bool, "eta": float,
    "use_clipped_model_output": bool,
    # σ spacing (euler, heun, dpm_solver, flow euler)
    "use_karras_sigmas": bool, "use_exponential_sigmas": bool, "use_beta_sigmas": bool,
    "sigma_min": float, "sigma_max": float, "sigmas": tuple,
    # euler
    "interpolation_type": str, "timestep_type": str, "final_sigmas_type": str,
    "s_churn": float, "s_tmin": float, "s_tmax": float, "s_noise": float,
    # dpm_solver
    "solver_order": int, "algorithm_type": str, "solver_type": str,
    "lower_order_final": bool, "euler_at_final": bool, "use_lu_lambdas": bool,
    "use_flow_sigmas": bool, "flow_shift": float, "lambda_min_clipped": float,
    # flow euler
    "shift": float, "use_dynamic_shifting": bool, "base_shift": float, "max_shift": float,
    "base_image_seq_len": int, "max_image_seq_len": int, "image_seq_len": int, "mu": float,
    "time_shift_type": str, "shift_terminal": float, "invert_sigmas": bool,
    "stochastic_sampling": bool,
}


def sample_options() -> ml_collections.ConfigDict:
  """config.sample.options: every sampler option, unset (None = the sampler's default)."""
  return ml_collections.ConfigDict(
      {name: placeholder(kind) for name, kind in SAMPLE_OPTION_TYPES.items()})


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
  model.class_conditional = True  # False: unconditional (only the null class)
  model.learn_sigma = False       # True: 2x output channels, a learned variance (gaussian)
  # Precision / memory knobs (transformer denoisers, e.g. dit; see BUILD_NOTES "Scale-out").
  model.dtype = "float32"         # compute dtype: float32 | bfloat16 (params stay float32)
  model.qk_norm = False           # RMSNorm on queries and keys in every attention
  model.attention = "xla"         # xla | cudnn (GPU) | pallas (TPU / GPU) | auto
  model.remat = "none"            # none | full | dots_saveable | nothing_saveable | ...
  model.scan_layers = False       # blocks as one nn.scan (params stacked on "layers")

  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.process = "flow"   # flow | gaussian
  diffusion.num_timesteps = 1000
  # '' = the process's own target: flow predicts the velocity ε - x0 (or x0: the network
  # outputs the clean image, turned into the velocity (x_t - x̂0) / max(t, 0.05));
  # gaussian: epsilon (default) | v | x0.
  diffusion.prediction = ""
  # -- flow only (SD3 §3.1, §5.3.2) --
  diffusion.time_sampling = "logit_normal"  # uniform | logit_normal | mode | cosmap
  diffusion.logit_mean = 0.0
  diffusion.logit_std = 1.0
  diffusion.mode_scale = 1.29
  diffusion.shift = 1.0                     # fixed resolution shift α (training and sampling)
  diffusion.shift_base_resolution = 0       # > 0: α = sqrt(image_size² / base²) instead
  diffusion.shift_by_resolution = ()        # ((image_size, α), …): wins when it has an entry
  # -- gaussian only --
  diffusion.beta_schedule = "linear"  # linear | scaled_linear | cosine | sigmoid | laplace | exp
  diffusion.beta_start = 1e-4
  diffusion.beta_end = 0.02
  diffusion.rescale_zero_snr = False  # Lin et al. 2024: rescale β to zero terminal SNR
  diffusion.variance_type = "fixed_small"  # fixed_small | fixed_large | learned_range | learned
  diffusion.vlb_weight = 0.001        # λ of L_hybrid (learned variance only)
  diffusion.loss_weighting = "simple"  # simple | snr | min_snr
  diffusion.snr_gamma = 5.0           # γ of min-SNR-γ

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
  optim.grad_accum_steps = 1   # k > 1: the global batch runs as k micro-batches (one update)
  # A non-finite loss or gradient: "stop" (error naming the step and metric, the last
  # checkpoint kept) or "skip" (that update is not applied; metric `skipped` counts them;
  # the learning-rate schedule then follows applied updates).
  optim.nan_policy = "stop"

  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.axes = ("data", "fsdp", "tensor")
  mesh.shape = (-1, 1, 1)
  # logical axis -> mesh axis ("" = replicated).
  # logical axis -> mesh axes ("" = replicated); mesh axes a mesh lacks are ignored, so
  # the same rules serve meshes with `dcn_*` (multi-slice / multi-node) axes.
  mesh.rules = (("batch", ("dcn_data", "dcn_fsdp", "data", "fsdp")), ("embed", ("dcn_fsdp", "fsdp")),
                ("mlp", "tensor"), ("heads", "tensor"), ("kv", ""), ("tokens", ""),
                ("act_embed", ""), ("layers", ""), ("classes", ""), ("conv_in", ""),
                ("conv_out", "tensor"), ("norm", ""))
  # Fail before training when a parameter larger than this (elements) would be fully
  # replicated although the mesh has an fsdp / tensor axis (0 = no check).
  mesh.max_replicated_size = 1 << 20

  config.ckpt = ckpt = ml_collections.ConfigDict()
  ckpt.every_steps = 500
  ckpt.max_to_keep = 3          # keep the newest N checkpoints ...
  ckpt.keep_every_steps = 0     # ... and also every checkpoint at a multiple of K (0 = none)

  config.eval = evaluation = ml_collections.ConfigDict()
  evaluation.every_steps = 0   # 0 = only at the end of training
  evaluation.grid_per_class = 10  # sample grid logged to TensorBoard
  # --mode=bpd (gaussian process): variational bound in bits/dim on held-out images.
  evaluation.bpd_split = "heldout"
  evaluation.bpd_num = 500
  evaluation.bpd_batch_size = 100
  evaluation.bpd_num_terms = 0  # 0 = all T terms (exact bound); k >= 2: k-term estimate

  config.sample = sample = ml_collections.ConfigDict()
  sample.num = 1000
  sample.batch_size = 250
  sample.labels = ()           # empty: balanced over classes; else the labels to cycle
  # flow: euler | gaussian: ddpm | ddim | euler | heun | dpm_solver (alias dpmpp)
  sample.sampler = "euler"
  sample.num_steps = 20
  sample.guidance_scale = 1.5
  sample.guidance_rescale = 0.0  # φ of Lin et al. 2024 (0 = off)
  sample.guidance_interval = ()  # (lo, hi) in model-time units: guide only there
  # Channels guided: 0 = all of the prediction's (diffusers' DiTPipeline); the official
  # DiT code guides only the first 3 of its 4 latent channels (set 3 to reproduce it).
  sample.guided_channels = 0
  # Classifier guidance (ADM; gaussian ddpm / ddim): a task=classify run trained on the
  # same process (configs/classifier_guidance.py:classifier), and its scale s.
  sample.classifier_workdir = ""
  sample.classifier_scale = 1.0
  sample.classifier_use_ema = True
  sample.respacing = ""        # ddpm / ddim: guided-diffusion respacing ("250", "ddim25")
  # The sampler's options, diffusers' scheduler option names (DDPMScheduler,
  # DDIMScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler,
  # DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler); unset = the sampler's
  # default, e.g. --config.sample.options.use_karras_sigmas=True. An option the chosen
  # sampler does not have is an error before training starts.
  sample.options = sample_options()
  sample.seed = 0
  sample.use_ema = True
  sample.judge = True          # built-in MNIST: classifier accuracy and Fréchet distance

  if preset == "dit":
    model.name = "dit"
    model.variant = "DiT-mnist/4"
    optim.learning_rate = 1e-3
    config.num_train_steps = 1250
  elif preset == "eps":
    # The default's model, data, optimizer and steps with DDPM's process instead:
    # ε-prediction, linear β, T = 1000 (the rectified-flow vs ε comparison of BUILD_NOTES).
    diffusion.process = "gaussian"
    sample.sampler = "dpm_solver"  # DPM-Solver++ 2M, 20 steps (= the default's 20 evaluations)
  elif preset == "dit_sigma":
    # DiT with a learned variance trained with improved DDPM's hybrid loss
    # (L_simple + 0.001·L_vlb), as DiT / ADM train; sampled by DDPM on a respaced chain.
    model.name = "dit"
    model.variant = "DiT-mnist/4"
    model.learn_sigma = True
    diffusion.process = "gaussian"
    diffusion.variance_type = "learned_range"
    sample.sampler = "ddpm"      # with the learned Σ (the process's variance type)
    sample.respacing = "100"
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
