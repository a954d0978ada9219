"""Model lookup by name: `config.model.name` picks the file, `config.model.variant`
a row of that file's VARIANTS table."""

import dataclasses
import importlib

import jax
import numpy as np

from ldm_jax.errors import check

# name -> module path; each module has VARIANTS and build(model_config, **overrides).
MODEL_FILES = {
    "dit": "ldm_jax.models.dit",
    "compact_unet": "ldm_jax.models.compact_unet",
    "noisy_classifier": "ldm_jax.models.noisy_classifier",
    "vae": "ldm_jax.models.vae",
    # The text-conditioned MM-DiT (+ its own text encoder): models/text_to_image.py.
    "mmdit": "ldm_jax.models.text_to_image",
}
# Models that take class labels as conditioning (the denoisers); `model.class_conditional
# = False` builds them unconditional.
CONDITIONAL_MODELS = ("dit", "compact_unet")
# Models trained with `config.task = "classify"` (classifier guidance).
CLASSIFIER_MODELS = ("noisy_classifier",)
# Precision / memory knobs of config.model and their "off" values: a model without the
# field ignores the knob only while it is off; set, it is an error (never silently ignored).
KNOB_DEFAULTS = {"dtype": "float32", "qk_norm": False, "attention": "xla", "remat": "none",
                 "scan_layers": False}


def model_module(name: str):
  check(name in MODEL_FILES, f"unknown model name {name!r}; valid: {sorted(MODEL_FILES)}")
  return importlib.import_module(MODEL_FILES[name])


def build_model(model_config, **overrides):
  """Returns the Flax module described by `model_config` (a ConfigDict).

  A denoiser with `model_config.class_conditional = False` is built unconditional:
  no class rows (num_classes 0), only the learned "null" embedding, which every
  example gets (class dropout 1; `is_unconditional` tells callers to pass null labels).
  """
  if model_config.name in CONDITIONAL_MODELS and not model_config.get("class_conditional", True):
    overrides = dict(overrides, num_classes=0, class_dropout_prob=1.0)
  return model_module(model_config.name).build(model_config, **overrides)


def is_unconditional(model) -> bool:
  """True for a denoiser built without classes (see `build_model`)."""
  return getattr(model, "num_classes", None) == 0


def model_labels(model, labels):
  """The labels a model is called with: the null class for an unconditional one."""
  import jax.numpy as jnp
  return jnp.full_like(labels, model.null_class) if is_unconditional(model) else labels


def count_params(params) -> int:
  """Number of scalars in a parameter pytree (works on ShapeDtypeStructs too)."""
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def variant_kwargs(module_class, variants: dict, model_config, overrides: dict) -> dict:
  """Constructor arguments: the `model_config.variant` row of `variants`, then the
  config's keys that are fields of `module_class`, then `overrides`."""
  check(model_config.variant in variants,
        f"unknown {model_config.name} variant {model_config.variant!r}; valid: {sorted(variants)}")
  fields = {f.name for f in dataclasses.fields(module_class)} - {"parent", "name"}
  for knob, default in KNOB_DEFAULTS.items():
    value = model_config.get(knob, default)
    check(knob in fields or value == default,
          f"model.{knob}={value!r} is not available for model.name={model_config.name!r} "
          f"(it has no such option); leave it at {default!r} or use a model that has it (dit)")
  kwargs = dict(variants[model_config.variant])
  kwargs.update({k: (tuple(v) if isinstance(v, list) else v)
                 for k, v in model_config.items() if k in fields})
  kwargs.update(overrides)
  if "dtype" in kwargs:
    from ldm_jax.models.layers import compute_dtype
    kwargs["dtype"] = compute_dtype(kwargs["dtype"])
  return kwargs

