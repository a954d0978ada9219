"""A latent diffusion model on the built-in MNIST: DiT on the 7x7x4 latents of the
CPU-trained mnist-kl-f4 autoencoder, read from a latent cache; samples are decoded
by that autoencoder (named in the cache's manifest) and judged like the quickstart's.

  python -m ldm_jax.main --config=configs/vae_mnist.py --workdir=runs/vae_kl
  python -m ldm_jax.main --config=configs/vae_mnist.py --workdir=runs/vae_kl \
      --mode=cache_latents --cache_dir=runs/mnist_latents
  python -m ldm_jax.main --config=configs/ldm_mnist.py --workdir=runs/ldm_mnist
  python -m ldm_jax.main --config=configs/ldm_mnist.py --workdir=runs/ldm_mnist --mode=sample

Presets: (default) DiT-mnist-latent/1 (patch 1: 49 tokens) as rectified flow;
`tiny` a seconds-long smoke configuration for the tests (DiT-tiny/1-sized).
Set --config.data.latent_cache=DIR for another cache; --config.data.vae=PATH to
decode with the autoencoder at a new location (its fingerprint must match the cache's).
"""

from ldm_jax.errors import UserError
from ldm_jax.run_config import load_sibling_config

PRESETS = ("", "tiny")


def get_config(arg: str | None = None):
  preset = (arg or "").strip()
  if preset not in PRESETS:
    raise UserError(f"unknown preset {preset!r} for configs/ldm_mnist.py; "
                    f"valid: {[p for p in PRESETS if p]} or none")
  config = load_sibling_config(__file__, "quickstart.py", "tiny" if preset == "tiny" else "dit")
  data = config.data
  data.source = "latents"
  data.latent_cache = "runs/mnist_latents"  # written by --mode=cache_latents
  data.vae = ""                # '' = the autoencoder the cache's manifest names
  data.image_size = 7          # latent size (28 / f4)
  data.channels = 4            # latent channels of mnist-kl-f4
  config.model.name = "dit"
  config.model.variant = "DiT-mnist-latent/1"
  if preset == "tiny":
    config.model.variant = "DiT-tiny/2"
    config.model.patch_size = 1
  return config
