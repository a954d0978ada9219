"""LDM first-stage autoencoders (task "autoencode") on the built-in MNIST-5k, sized
for a 2-core CPU: L1 (+ LPIPS when weights are given) + PatchGAN, KL- or
VQ-regularised, through the same train_and_evaluate as the denoisers.

  python -m ldm_jax.main --config=configs/vae_mnist.py --workdir=runs/vae_kl
  python -m ldm_jax.main --config=configs/vae_mnist.py:vq --workdir=runs/vae_vq

Presets (`--config=configs/vae_mnist.py:NAME`):
  (default)  mnist-kl-f4: 28x28 digits -> 7x7x4 latents, KL weight 1e-6.
  vq         mnist-vq-f4: 7x7 codes from a 1,024-entry codebook (dim 4).
  vq_ema     the vq preset with an EMA codebook instead of the codebook loss.
  tiny / tiny_vq   seconds-long smoke configurations used by the tests.

LPIPS: set --config.loss.lpips_vgg=/path/to/vgg16-397923af.pth (torchvision's
ImageNet VGG16; the linear heads come from an installed `lpips` package or
--config.loss.lpips_heads). Without it the run says so and trains without the
perceptual loss (LPIPS is not reported then).
"""

import ml_collections

from ldm_jax.errors import UserError
from ldm_jax.run_config import load_sibling_config

PRESETS = ("", "vq", "vq_ema", "tiny", "tiny_vq")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = (arg or "").strip()
  if preset not in PRESETS:
    raise UserError(f"unknown preset {preset!r} for configs/vae_mnist.py; "
                    f"valid: {[p for p in PRESETS if p]} or none")
  config = ml_collections.ConfigDict()
  config.task = "autoencode"
  config.seed = 0
  config.num_train_steps = 800
  config.log_every_steps = 100
  config.max_steps_per_run = 0

  base = load_sibling_config(__file__, "quickstart.py")
  config.data = data = base.data  # built-in MNIST, batch 32 (image_size a multiple of f)

  config.model = model = ml_collections.ConfigDict()
  model.name = "vae"
  model.variant = "mnist-kl-f4"  # any row of ldm_jax/models/vae.py VARIANTS
  model.dtype = "float32"
  model.attention = "xla"

  # LDM's LPIPSWithDiscriminator / VQLPIPSWithDiscriminator (ldm_jax/training/autoencoder.py).
  config.loss = loss = ml_collections.ConfigDict()
  loss.pixel = "l1"              # l1 | l2
  loss.perceptual_weight = 1.0   # LPIPS weight (needs lpips_vgg)
  loss.lpips_vgg = ""            # torchvision VGG16 weights file ('' = no LPIPS, said once)
  loss.lpips_heads = ""          # lpips' weights/v0.1/vgg.pth ('' = the installed package's)
  loss.logvar = 0.0              # fixed output log-variance s: NLL = rec / e^s + s
  loss.reduction = "sum"         # sum (per image, LDM's KL loss) | mean (LDM's VQ loss)
  loss.kl_weight = 1e-6
  loss.codebook_weight = 1.0
  loss.ema_codebook_decay = 0.99  # model.codebook_update = "ema" only
  loss.disc_start = 400          # discriminator (and the generator's GAN term) from this step
  loss.disc_weight = 0.5         # times the adaptive weight
  loss.disc_factor = 1.0
  loss.disc_loss = "hinge"       # hinge | vanilla
  loss.disc_layers = 2           # PatchGAN n_layers (LDM: 3 at 256 px)
  loss.disc_channels = 32        # PatchGAN ndf (LDM: 64)
  loss.disc_norm = "batch"       # batch | group | none

  config.optim = optim = base.optim  # the autoencoder's: the quickstart's AdamW recipe ...
  optim.b1 = 0.5                 # ... with LDM's Adam betas (0.5, 0.9) for both networks
  optim.b2 = 0.9
  config.disc_optim = optim.copy_and_resolve_references()  # the discriminator's
  config.disc_optim.learning_rate = 2e-3

  config.mesh = mesh = base.mesh
  mesh.rules = tuple(mesh.rules) + (("codebook", ""),)  # VQ codebook rows: replicated

  config.ckpt = ckpt = ml_collections.ConfigDict()
  ckpt.every_steps = 400
  ckpt.max_to_keep = 2
  ckpt.keep_every_steps = 0

  config.eval = evaluation = ml_collections.ConfigDict()
  evaluation.every_steps = 0     # 0 = only at the end of training
  evaluation.use_ema = False     # LDM evaluates the raw autoencoder
  evaluation.split = "validation"  # non-MNIST sources (MNIST: its held-out 500)
  evaluation.num_images = 500

  # --mode=cache_latents (ldm_jax/first_stage.py): encode config.data into a latent cache.
  config.cache = cache = ml_collections.ConfigDict()
  cache.store = ""               # '' = mean_std (KL: a fresh posterior sample each step) / mean (VQ)
  cache.dtype = "float32"        # float32 | float16
  cache.split = "train"          # MNIST: the 4,500 training digits (train | heldout | all)
  cache.batch_size = 250
  cache.shard_size = 4096
  cache.use_ema = False
  cache.scale = "auto"           # auto: LDM's scale_by_std (1 / std of the first batch) | model
  cache.num_examples = 0         # encode only the first N examples (0 = all)

  if preset in ("vq", "vq_ema", "tiny_vq"):
    model.variant = "mnist-vq-f4"
    model.codebook_update = "ema" if preset == "vq_ema" else "loss"
    loss.reduction = "mean"      # VQLPIPSWithDiscriminator averages the NLL
  if preset in ("tiny", "tiny_vq"):
    model.variant = "tiny-vq" if preset == "tiny_vq" else "tiny-kl"
    data.batch_size = 16
    config.num_train_steps = 6
    config.log_every_steps = 2
    ckpt.every_steps = 3
    loss.disc_start = 3
    loss.disc_layers = 1
    loss.disc_channels = 8
    optim.warmup_steps = 2
    evaluation.num_images = 40
  return config
