"""Generative processes (Gaussian diffusion, rectified flow), their samplers and
guidance, behind one interface: see `process.py`."""

from ldm_jax.diffusion.process import build_process

__all__ = ["build_process"]
