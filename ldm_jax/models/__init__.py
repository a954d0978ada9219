"""Denoisers, looked up by name: `build_model(config.model)`."""

from ldm_jax.models.registry import build_model, count_params, MODEL_FILES

__all__ = ["build_model", "count_params", "MODEL_FILES"]
