"""ldm_jax: latent diffusion (DDPM/DDIM, DiT, U-Nets, rectified flow) in JAX/Flax."""

__version__ = "0.1.0"
