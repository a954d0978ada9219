"""Checks on a resolved config and its workdir, shared by training and sampling:
validation with clear messages, the resolved config file, and resume compatibility."""

import json
import os
import re

import ml_collections

from ldm_jax.errors import UserError, check

CONFIG_FILE = "config.json"
# Sections / keys that define the checkpointed state; changing them breaks a resume.
# (optim.grad_clip changes the optimizer-state structure; the learning rate does not.)
# `task` (denoise | classify) decides what the params are; absent (older runs) = denoise.
# autoencode: the discriminator's shape and its optimizer's clipping too.
STATE_DEFINING = ("task", "model", "diffusion", "data.image_size", "data.channels",
                  "data.num_classes", "optim.grad_clip", "disc_optim.grad_clip",
                  "loss.disc_layers", "loss.disc_channels", "loss.disc_norm")


# denoise: a denoiser on images or cached latents; classify: a noisy classifier
# (classifier guidance); autoencode: an LDM first stage (KL / VQ + LPIPS + PatchGAN).
TASKS = ("denoise", "classify", "autoencode")
AUTOENCODER_MODELS = ("vae",)


def task_of(config) -> str:
  """`config.task`; configs (and saved config.json files) without it are "denoise"."""
  task = config.get("task", "denoise")
  check(task in TASKS, f"unknown task {task!r}; valid: {list(TASKS)}")
  return task


def validate(config: ml_collections.ConfigDict, need_data: bool = True) -> None:
  """Fails with a UserError naming the first invalid value. `need_data=False` (ahead-
  of-time compilation: shapes only) lets a latent cache be absent."""
  check(config.num_train_steps >= 0, f"num_train_steps must be >= 0, got {config.num_train_steps}")
  check(config.data.batch_size > 0, f"data.batch_size must be > 0, got {config.data.batch_size}")
  check(config.ckpt.every_steps > 0, f"ckpt.every_steps must be > 0, got {config.ckpt.every_steps}")
  check(config.log_every_steps > 0, f"log_every_steps must be > 0, got {config.log_every_steps}")
  task = task_of(config)
  is_autoencoder = config.model.name in AUTOENCODER_MODELS
  check(is_autoencoder == (task == "autoencode"),
        f"task={task!r} with model.name={config.model.name!r}: task 'autoencode' trains an "
        f"autoencoder {list(AUTOENCODER_MODELS)}, and an autoencoder is trained only by it")
  if task == "autoencode":
    check(config.data.source != "latents", "task 'autoencode' trains on images; "
          "data.source='latents' (a latent cache) is for denoisers")
    return  # no sampler / process; the loss section is checked when the step is built
  if config.data.source == "latents" and need_data:
    usage = config.get("usage", "")
    check(bool(config.data.get("latent_cache", "")),
          "data.source='latents' needs data.latent_cache=DIR, a cache written by "
          "--mode=cache_latents" + (f". {usage}" if usage else ""))
  check(config.sample.num > 0, f"sample.num must be > 0, got {config.sample.num}")
  check(config.sample.batch_size > 0,
        f"sample.batch_size must be > 0, got {config.sample.batch_size}")
  guidance = config.sample.get("guidance_scale", 1.0)
  text = bool(config.data.get("tokenizer", ""))
  check(not text or config.model.name == "mmdit",
        f"data.tokenizer={config.data.get('tokenizer')!r} makes a text-to-image run, which "
        f"needs model.name='mmdit' (got {config.model.name!r})")
  check(text or config.model.name != "mmdit",
        "model.name='mmdit' is text-conditioned: set data.tokenizer (e.g. 'shapes-words' with "
        "data.source='shapes'; see configs/mmdit_256.py)")
  if text:
    # The unconditional input (the null condition) is trained by whole-condition
    # dropout, or for SD3 by all three encoders dropped to the null's parts at once.
    by_encoders = (config.data.get("tokenizer", "") == "sd3"
                   and config.model.get("text_encoder_dropout", 0.0) > 0)
    check(guidance == 1.0 or config.model.get("text_dropout", 0.0) > 0 or by_encoders,
          f"sample.guidance_scale={guidance} needs a model trained with condition dropout "
          f"(model.text_dropout > 0, got {config.model.get('text_dropout', 0.0)}; or for SD3 "
          f"model.text_encoder_dropout > 0); set guidance_scale=1.0 or train with text "
          f"dropout")
    check(config.data.num_classes == 0 and not tuple(config.sample.get("labels", ())),
          "a text-to-image run (data.tokenizer set) has no classes: data.num_classes must be 0 "
          "and sample.labels empty (prompts come from sample.prompts)")
  conditional = config.model.get("class_conditional", True)
  check(text or conditional or guidance == 1.0,
        f"sample.guidance_scale={guidance} (classifier-free guidance) needs a class-conditional "
        f"denoiser, but model.class_conditional=False; set sample.guidance_scale=1.0")
  check(text or guidance == 1.0 or config.model.get("class_dropout_prob", 0.1) > 0,
        f"sample.guidance_scale={guidance} needs the null class, which only exists with "
        f"model.class_dropout_prob > 0 (got {config.model.get('class_dropout_prob')}); "
        f"set guidance_scale=1.0 or train with class dropout")
  from ldm_jax.models.registry import CLASSIFIER_MODELS
  is_classifier = config.model.name in CLASSIFIER_MODELS
  check(is_classifier == (task == "classify"),
        f"task={task!r} with model.name={config.model.name!r}: task 'classify' needs a "
        f"classifier model {list(CLASSIFIER_MODELS)}, task 'denoise' a denoiser")
  rescale = config.sample.get("guidance_rescale", 0.0)
  check(0.0 <= rescale <= 1.0, f"sample.guidance_rescale must be in [0, 1], got {rescale}")
  interval = tuple(config.sample.get("guidance_interval", ()))
  check(len(interval) in (0, 2) and (not interval or interval[0] <= interval[1]),
        f"sample.guidance_interval must be empty or (lo, hi) with lo <= hi in model-time "
        f"units, got {interval}")
  if config.sample.get("classifier_workdir", ""):
    from ldm_jax.diffusion.classifier_guidance import check_guided_sampler
    check_guided_sampler(config.diffusion.process, config.sample.sampler)
    scale = config.sample.get("classifier_scale", 0.0)
    check(scale >= 0, f"sample.classifier_scale must be >= 0, got {scale}")
  guided = int(config.sample.get("guided_channels", 0))
  check(0 <= guided <= config.data.channels,
        f"sample.guided_channels={guided} must be in [0, {config.data.channels}] "
        f"(0 = all {config.data.channels} prediction channels)")
  variance = config.diffusion.get("variance_type", "fixed_small")
  if config.diffusion.process == "gaussian" and variance in ("learned", "learned_range"):
    check(config.model.get("learn_sigma", False),
          f"diffusion.variance_type={variance!r} trains a variance output: the model must "
          f"have one (model.learn_sigma=True; model.name={config.model.name!r} has "
          f"learn_sigma={config.model.get('learn_sigma', 'no such option')!r})")
  for label in config.sample.labels:
    check(0 <= int(label) < config.data.num_classes,
          f"sample.labels contains {label}; valid labels are 0..{config.data.num_classes - 1}")


def prepare_workdir(workdir: str, create: bool = True) -> str:
  """Absolute workdir path; it must be (or become) a writable directory."""
  check(bool(workdir), "--workdir is required")
  check(not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", workdir),
        f"--workdir {workdir!r}: URLs (gs://, s3://, …) are not supported yet; give a path on "
        f"a filesystem every process shares (NFS / Filestore, or a Cloud Storage FUSE mount "
        f"such as /gcs/BUCKET/runs/x on TPU VMs)")
  path = os.path.abspath(workdir)
  check(not os.path.exists(path) or os.path.isdir(path),
        f"--workdir {workdir!r} exists and is not a directory; give a directory path")
  if create:
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:
      raise UserError(f"--workdir {workdir!r} cannot be created: {e.strerror}") from e
    check(os.access(path, os.W_OK | os.X_OK),
          f"--workdir {workdir!r} is not writable; choose a writable directory")
  return path


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = list(value) if isinstance(value, tuple) else value
  return out


# Model keys that change how the step computes, not what the state holds: a run may
# resume with other values (e.g. remat on a smaller machine).
EXECUTION_ONLY = ("model.remat", "model.attention", "model.dtype")


def _with_task(flat: dict) -> dict:
  """A flattened config with `task` and the model knobs filled in: configs written
  before tasks / knobs existed are denoisers with the knobs off."""
  from ldm_jax.models.registry import KNOB_DEFAULTS
  knobs = {f"model.{k}": v for k, v in KNOB_DEFAULTS.items()}
  return {"task": "denoise", **knobs, **flat}


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  """A JSON round-trippable dict (tuples become lists)."""
  return json.loads(config.to_json())


def incompatible_keys(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
  """State-defining keys whose values differ between a saved and a new config."""
  old, new = _with_task(_flatten(saved)), _with_task(_flatten(config_to_dict(config)))
  keys = sorted(set(old) | set(new), key=lambda k: (k != "task", k))  # the task first
  return [k for k in keys
          if any(k == p or k.startswith(p + ".") for p in STATE_DEFINING)
          and k not in EXECUTION_ONLY
          and old.get(k, "<absent>") != new.get(k, "<absent>")]


def check_compatible(saved: dict | None, config, where: str) -> None:
  """Fails if `config` cannot continue / sample from the run saved in `where`."""
  if saved is None:
    return
  bad = incompatible_keys(saved, config)
  if bad:
    old, new = _with_task(_flatten(saved)), _with_task(_flatten(config_to_dict(config)))
    details = "; ".join(f"{k}: saved {old.get(k, '<absent>')!r} vs given {new.get(k, '<absent>')!r}"
                        for k in bad[:8])
    raise UserError(f"workdir {where} holds a run with an incompatible config ({details}). "
                    f"Use the same config, or a new --workdir.")


def read_saved_config(workdir: str) -> dict | None:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise UserError(f"{path} is not valid JSON ({e}); restore it or move it away "
                    f"(the checkpoints hold their own copy of the config)") from e


def write_config(workdir: str, config) -> None:
  """Writes the resolved config as JSON (atomically) into the workdir."""
  path = os.path.join(workdir, CONFIG_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(config_to_dict(config), f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)


def load_sibling_config(config_file: str, name: str, preset: str | None = None):
  """`get_config(preset)` of the config file `name` (e.g. "quickstart.py") in the same
  directory as `config_file` (a config's own `__file__`): configs build on each other
  by path, whatever path they were given by."""
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name)
  spec = importlib.util.spec_from_file_location(f"_ldm_jax_config_{name[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def override(config, **dotted):
  """Sets `config[a][b] = value` for each `a.b=value` (tests and notebooks)."""
  for key, value in dotted.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config
