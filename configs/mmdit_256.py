"""SD3-style text-to-image: an MM-DiT trained with rectified flow on captioned images.

  python -m ldm_jax.main --config=configs/mmdit_256.py:shapes --workdir=runs/shapes
  python -m ldm_jax.main --config=configs/mmdit_256.py:shapes --workdir=runs/shapes \
      --mode=sample [--config.sample.prompts=prompts.txt]

Presets (`--config=configs/mmdit_256.py:NAME`):
  (default)  SD3-medium (2 B MM-DiT) on 256x256 images as 32x32x16 latents of the SD3
             VAE, conditioned on frozen CLIP-L + OpenCLIP-G + T5-XXL embeddings, from
             local folders the user names; bf16, QK RMSNorm, remat, FSDP. Two steps
             (SD3_USAGE): --mode=cache_latents encodes data.folder (image + .txt
             caption pairs) with cache.vae (the SD3 VAE) and data.text_pipeline (a
             diffusers SD3 folder's three text encoders) into a sharded, fingerprinted
             latent + text-embedding cache; training reads data.latent_cache. Without
             them it stops in seconds and says what it needs.
  shapes     the whole LDM chain on the built-in captioned shapes (ldm_jax/data/shapes.py)
             at 64x64, trained from scratch on a 2-core CPU by one command
             (ldm_jax/chain.py): the shapes-kl-f4 autoencoder (config.first_stage,
             64x64x3 -> 16x16x4) in WORKDIR/first_stage, a captioned latent cache of
             24,000 shapes in WORKDIR/latents, then a small MM-DiT (4x4 latent patches:
             16 image tokens) with its own two-layer text encoder over the built-in word
             tokenizer, rectified flow with logit-normal times and shift 3. Samples are
             decoded by that autoencoder and scored by the shapes judge.
  shapes_vae the chain's first stage on its own (an autoencode run).
  shapes_pixels  the same MM-DiT recipe directly on 64x64 pixels (8x8 patches), kept
             for comparison (BUILD_NOTES: the latent chain is far better on a CPU budget).
  tiny / tiny_chain  seconds-long smoke configurations (pixels / the chain) for the tests.
"""

import ml_collections

from ldm_jax.errors import UserError
from ldm_jax.run_config import load_sibling_config

PRESETS = ("", "shapes", "shapes_vae", "shapes_pixels", "tiny", "tiny_chain")


def _text_to_image_base():
  """The quickstart's loop settings with a text-conditioned MM-DiT."""
  config = load_sibling_config(__file__, "quickstart.py", None)
  model = config.model
  model.name = "mmdit"
  model.text_encoder = "shapes-words"  # text_encoders.VARIANTS row; '' = precomputed embeddings
  model.text_vocab_size = 0            # 0 = the variant's
  model.text_max_length = 0            # 0 = the variant's
  model.text_pad_id = 0
  model.text_dropout = 0.1             # P(condition -> the empty prompt's), for CFG
  model.qk_norm = True                 # RMSNorm on q and k (SD3.5; the paper at scale)
  model.class_dropout_prob = 0.0
  data = config.data
  data.num_classes = 0
  data.tokenizer = ""
  data.max_tokens = 12
  config.mesh.rules = tuple(config.mesh.rules) + (("vocab", ""),)
  config.sample.judge = False
  return config


def _shapes_data(data, size: int):
  """The built-in captioned shapes (ldm_jax/data/shapes.py) at size x size pixels."""
  data.source = "shapes"
  data.split = "train"
  data.image_size = size
  data.channels = 3
  data.num_classes = 0
  data.tokenizer = "shapes-words"
  data.max_tokens = 12
  data.num_examples = 1_000_000  # generated on the fly, deterministic per index
  data.two_shape_fraction = 0.5
  data.shapes_seed = 0
  return data


def _shapes(config, size: int):
  _shapes_data(config.data, size)
  config.model.text_vocab_size = 17  # the word tokenizer's vocabulary
  config.model.text_max_length = config.data.max_tokens
  config.sample.judge = True
  config.sample.prompts = ""  # a file; '' = the held-out prompts of the shapes grammar
  return config


def _shapes_recipe(config):
  """Training and sampling of the shapes MM-DiTs (pixels or latents) on a 2-core CPU."""
  config.num_train_steps = 3000
  config.data.batch_size = 32
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 200
  config.optim.ema_decay = 0.999
  config.ckpt.every_steps = 1000
  config.eval.every_steps = 1000
  config.sample.num = 256      # held-out prompts: 128 one-shape, 128 two-shape images
  config.sample.batch_size = 128
  config.sample.num_steps = 20
  config.sample.guidance_scale = 3.0
  # SD3's time shift (§5.3.2): more training and sampling steps at high noise, where
  # the layout is decided (shift 1 left fragmented shapes; BUILD_NOTES).
  config.diffusion.shift = 3.0
  return config


def shapes_autoencoder(size: int = 64, steps: int = 500):
  """The first stage of the shapes chain: the shapes-kl-f4 KL autoencoder (64x64x3 ->
  16x16x4) on the captioned shapes, an L2 reconstruction loss (L1 drops the sparse
  blue shapes for hundreds of steps; BUILD_NOTES) with LDM's KL weight, no
  discriminator (not needed for flat shapes on black), and its latent-cache options."""
  config = load_sibling_config(__file__, "vae_mnist.py", None)
  _shapes_data(config.data, size)
  config.data.batch_size = 16
  config.model.variant = "shapes-kl-f4"
  config.loss.pixel = "l2"
  config.loss.disc_start = 10**9  # never: the GAN terms stay weighted 0
  config.num_train_steps = steps
  config.log_every_steps = 100
  config.ckpt.every_steps = 300
  config.eval.split = "heldout"   # shapes with the held-out captions
  config.eval.num_images = 200
  cache = config.cache
  cache.split = "train"
  cache.num_examples = 24_000     # the shapes are endless: encode this many
  cache.batch_size = 250
  cache.store = "mean_std"        # a fresh posterior sample each training step
  cache.scale = "auto"            # LDM's scale_by_std
  return config


def get_config(arg: str | None = None):
  preset = (arg or "").strip()
  if preset not in PRESETS:
    raise UserError(f"unknown preset {preset!r} for configs/mmdit_256.py; "
                    f"valid: {[p for p in PRESETS if p]} or none")
  if preset == "shapes_vae":
    return shapes_autoencoder()
  config = _text_to_image_base()
  if preset == "shapes_pixels":
    config = _shapes_recipe(_shapes(config, 64))
    config.model.variant = "shapes"
    return config
  if preset in ("shapes", "tiny_chain"):
    # The LDM chain: first stage, latent cache, then the MM-DiT on the latents; all
    # from this one config (ldm_jax/chain.py), in --workdir.
    config = _shapes(config, 64)
    config.first_stage = shapes_autoencoder()
    _shapes_data(config.data, 16)
    data = config.data
    data.source = "latents"
    data.latent_cache = ""       # '' = WORKDIR/latents, built from config.first_stage
    data.vae = ""                # the autoencoder the cache's manifest names
    data.channels = 4
    config.model.variant = "shapes-latent"
    config = _shapes_recipe(config)
    config.num_train_steps = 6000  # 16 image tokens: 2.7x the steps/s of the pixel model
    if preset == "tiny_chain":
      stage = config.first_stage
      stage.model.variant = "tiny-kl"  # f2: 32x32x3 -> 16x16x4
      _shapes_data(stage.data, 32)
      stage.data.batch_size = 8
      stage.num_train_steps = 2
      stage.log_every_steps = 1
      stage.ckpt.every_steps = 2
      stage.optim.warmup_steps = 1
      stage.eval.num_images = 8
      stage.cache.num_examples = 48
      stage.cache.batch_size = 16
      config.model.variant = "tiny"
      config.model.patch_size = 4
      config.model.input_size = 16
      config.model.in_channels = 4
      config.model.pos_embed_max_size = 8
      config.model.text_encoder = "tiny-clip"
      _tiny_loop(config)
    return config
  if preset == "tiny":
    config = _shapes(config, 32)
    config.model.variant = "tiny"
    config.model.patch_size = 8
    config.model.in_channels = 3
    config.model.pos_embed_max_size = 8
    config.model.text_encoder = "tiny-clip"
    _tiny_loop(config)
    return config
  return _sd3_medium(config)


def _tiny_loop(config):
  config.num_train_steps = 4
  config.log_every_steps = 2
  config.data.batch_size = 8
  config.ckpt.every_steps = 2
  config.sample.num = 4
  config.sample.batch_size = 4
  config.sample.num_steps = 2


# The SD3-medium preset: two commands (encode once, then train on the cache).
SD3_USAGE = (
    "configs/mmdit_256.py (SD3-medium at 256²) trains on a latent + text-embedding cache. "
    "1) encode once: python -m ldm_jax.main --config=configs/mmdit_256.py "
    "--mode=cache_latents --workdir=runs/sd3 --cache_dir=CACHE "
    "--config.data.folder=IMAGES (images with a .txt caption next to each: photo.jpg + "
    "photo.txt) --config.cache.vae=SD3/vae (the SD3 VAE: a diffusers AutoencoderKL folder, "
    "16 latent channels) --config.data.text_pipeline=SD3 (a diffusers "
    "StableDiffusion3Pipeline folder with text_encoder, text_encoder_2, text_encoder_3 and "
    "their tokenizers); "
    "2) train: python -m ldm_jax.main --config=configs/mmdit_256.py --workdir=runs/sd3 "
    "--config.data.latent_cache=CACHE; sampling also needs --config.data.text_pipeline=SD3 "
    "and --config.sample.prompts=FILE. To train the whole text-to-image chain offline on a "
    "CPU instead, use the built-in preset: --config=configs/mmdit_256.py:shapes")


def _sd3_medium(config):
  """SD3-medium (2 B MM-DiT, here with QK RMSNorm) at 256² on 32x32x16 latents of the
  SD3 VAE, conditioned on frozen CLIP-L + OpenCLIP-G + T5-XXL embeddings from a cache;
  the SD3 paper's pre-training recipe (§5.3: AdamW 1e-4, batch 1024, EMA 0.9999,
  logit-normal(0, 1) times, each text encoder dropped 46.4 % of the time)."""
  config.usage = SD3_USAGE
  data = config.data
  data.source = "latents"
  data.latent_cache = ""        # the cache written by step 1 of SD3_USAGE
  data.folder = ""              # step 1: images + .txt captions
  data.image_size = 32          # latents: 256 px / the VAE's factor 8
  data.channels = 16
  data.num_classes = 0
  data.batch_size = 1024
  data.worker_count = 8
  data.tokenizer = "sd3"
  data.text_pipeline = ""       # a diffusers SD3 pipeline folder (its three text encoders)
  data.max_tokens = 77          # T5's max_sequence_length in training (the paper's 77)
  data.clip_skip = 0            # 0: CLIP's penultimate layer, as SD3
  data.text_use_t5 = True
  data.null_text = "zeros"      # what a dropped encoder becomes: zeros | empty (the "" prompt's)
  model = config.model
  model.variant = "sd3-medium"
  model.text_encoder = ""       # frozen encoders: embeddings come from the cache
  model.text_vocab_size = 0
  model.text_max_length = 0
  model.text_dropout = 0.0
  model.text_encoder_dropout = 0.464  # each encoder, independently (all three: ~10 %)
  model.qk_norm = True
  model.dtype = "bfloat16"
  model.remat = "full"
  model.attention = "auto"
  config.mesh.shape = (1, -1, 1)      # fully-sharded data parallel over every device
  diffusion = config.diffusion
  diffusion.process = "flow"
  diffusion.time_sampling = "logit_normal"
  diffusion.logit_mean = 0.0
  diffusion.logit_std = 1.0
  diffusion.shift_base_resolution = 32  # α = 1 at 256², sqrt(m/n) at other sizes
  optim = config.optim
  optim.learning_rate = 1e-4
  optim.schedule = "constant"
  optim.warmup_steps = 1000
  optim.weight_decay = 0.0
  optim.b2 = 0.999
  optim.ema_decay = 0.9999
  optim.ema_warmup = False
  config.num_train_steps = 500_000
  config.log_every_steps = 100
  config.ckpt.every_steps = 5000
  config.eval.every_steps = 5000
  config.cache = cache = ml_collections.ConfigDict()  # step 1 (--mode=cache_latents)
  cache.vae = ""                 # the SD3 VAE folder
  cache.source = "captions"      # data.folder's image + .txt pairs
  cache.image_size = 256
  cache.store = "mean_std"
  cache.dtype = "float16"        # halves the ~0.95 MB of text embeddings per image
  cache.split = "train"
  cache.batch_size = 64
  cache.shard_size = 1024
  cache.use_ema = False
  cache.scale = "model"          # the VAE's own scaling / shift factors (SD3: 1.5305 / 0.0609)
  sample = config.sample
  sample.prompts = ""            # a file, one prompt per line
  sample.num = 64
  sample.batch_size = 16
  sample.num_steps = 28
  sample.guidance_scale = 7.0
  sample.judge = False
  return config
