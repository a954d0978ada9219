"""Generative processes (Gaussian diffusion, rectified flow), their samplers and
guidance, behind one interface: see `process.py`."""

from ldm_jax.diffusion.diffusers_schedulers import SchedulerSetup, from_diffusers_scheduler
from ldm_jax.diffusion.process import build_process

__all__ = ["build_process", "from_diffusers_scheduler", "SchedulerSetup"]
