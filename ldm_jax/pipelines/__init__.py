"""Inference pipelines that load a local weights folder and generate."""

from ldm_jax.pipelines.sd3 import StableDiffusion3Pipeline

__all__ = ["StableDiffusion3Pipeline"]
