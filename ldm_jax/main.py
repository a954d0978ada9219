"""Entry point.

  python -m ldm_jax.main --config=configs/quickstart.py[:preset] --workdir=DIR \
      [--mode=train|sample|bpd|cache_latents] [--config.a.b=value ...]

  --mode=cache_latents --cache_dir=DIR   encodes config.data with the autoencoder of
      the autoencode run in --workdir into a new latent cache DIR (ldm_jax/first_stage.py)
  --mode=export --export=PATH [--export_format=diffusers|ldm]   writes the autoencoder of
      the autoencode run in --workdir as a diffusers folder or an LDM-layout .safetensors;
      for a text-to-image run (model.name=mmdit) the MM-DiT as a diffusers
      SD3Transformer2DModel folder plus its text encoder (ldm_jax/pipelines/export.py)

A mistake the user can fix (bad config value, bad workdir, damaged checkpoint)
ends with one line `error: ...` and exit status 2; nothing is overwritten.
"""

import importlib.util
import io
import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from ldm_jax.distributed import initialize_distributed
from ldm_jax.errors import UserError

MODES = ("train", "sample", "bpd", "cache_latents", "export")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/X.py[:preset]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
_MODE = flags.DEFINE_string("mode", "train", f"One of {MODES}.")
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", None, "--mode=cache_latents: the new latent cache directory to write.")
_EXPORT = flags.DEFINE_string("export", None, "--mode=export: the new folder / file to write.")
_EXPORT_FORMAT = flags.DEFINE_string("export_format", "diffusers",
                                     "--mode=export: diffusers (a folder) or ldm (.safetensors).")
FLAGS = flags.FLAGS
_CACHE = flags.DEFINE_string(
    "compilation_cache", os.path.join(os.path.expanduser("~"), ".cache", "ldm_jax", "jax_cache"),
    "Persistent XLA compilation cache directory ('' to disable).")


def _setup_logging():
  handler = logging.StreamHandler(sys.stdout)
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  logger = logging.getLogger("ldm_jax")
  logger.handlers[:] = [handler]
  logger.setLevel(logging.INFO)
  logger.propagate = False


def _explain(error: BaseException) -> str:
  """The innermost UserError's message if there is one, else the error on one line."""
  seen, text = error, str(error)
  while seen is not None:
    if isinstance(seen, UserError):
      text = str(seen)
      break
    seen = seen.__cause__ or seen.__context__
  # config_flags re-raises errors of a config file as text holding the traceback.
  marker = "UserError: "
  if marker in text:
    return text.split(marker, 1)[1].splitlines()[0]
  if "No such file or directory" in text:
    missing = text.rsplit("No such file or directory: ", 1)[-1].strip()
    return f"config file {missing} does not exist (give --config=path/to/config.py[:preset])"
  return " ".join(text.split())


def _parse_flags(argv):
  """absl flag parsing where a bad config file or override is a one-line error."""
  try:
    return FLAGS(argv)
  except Exception as e:  # config_flags raises whatever the config file or override raised
    message = _explain(e)
    if isinstance(e, (KeyError, AttributeError)):
      message = _unknown_override(argv) or message
    print(f"error: {message}\nPass --helpshort for usage.", file=sys.stderr)
    sys.exit(2)


def _unknown_override(argv) -> str | None:
  """Names the first `--config.a.b=v` whose key path the config does not have."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None:
    return None
  path, _, preset = spec.partition(":")
  try:
    module_spec = importlib.util.spec_from_file_location("_ldm_jax_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    base = module.get_config(preset or None)
  except Exception:  # the file's own error is reported elsewhere
    return None
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    keys = arg[len("--config."):].split("=", 1)[0].split(".")
    node = base
    for depth, key in enumerate(keys):
      if not hasattr(node, "keys") or key not in node.keys():
        where = ".".join(keys[:depth]) or "the top level"
        valid = sorted(node.keys()) if hasattr(node, "keys") else []
        return (f"unknown config key {'.'.join(keys[:depth + 1])!r} in {arg}; "
                f"valid keys of {where}: {valid}")
      node = node[key]
  return None


def _load_config():
  """The parsed config; a file that is missing or fails to load is a UserError."""
  config = _CONFIG.value
  if config is None:
    raise UserError("--config is required, e.g. --config=configs/quickstart.py")
  try:
    config.keys()  # config_flags defers load errors until first access
  except Exception as e:
    raise UserError(_explain(e)) from e
  return config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _setup_logging()
  absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax / Grain chatter
  try:
    if _MODE.value not in MODES:
      raise UserError(f"unknown --mode={_MODE.value!r}; valid: {list(MODES)}")
    config = _load_config()
    if not _WORKDIR.value:
      raise UserError("--workdir is required, e.g. --workdir=runs/quickstart")
    import jax
    initialize_distributed(jax, _WORKDIR.value)
    if _CACHE.value:
      jax.config.update("jax_compilation_cache_dir", _CACHE.value)
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    if _MODE.value != "cache_latents":  # a config that builds its own first stage
      from ldm_jax.chain import resolve
      config = resolve(config, _WORKDIR.value, _MODE.value)
      if config is None:  # its autoencoder was stopped early: the same command resumes
        return
    if _MODE.value == "train":
      from ldm_jax.train import train_and_evaluate
      train_and_evaluate(config, _WORKDIR.value)
    elif _MODE.value == "sample":
      from ldm_jax.sample import sample_from_workdir
      sample_from_workdir(config, _WORKDIR.value)
    elif _MODE.value == "export":
      from ldm_jax import run_config
      from ldm_jax.first_stage import export_first_stage
      if not _EXPORT.value:
        raise UserError("--mode=export needs --export=PATH (a new folder, or a .safetensors "
                        "file with --export_format=ldm)")
      saved = run_config.read_saved_config(_WORKDIR.value)
      if config.model.name == "mmdit":  # a text-to-image run: MM-DiT (+ its text encoder)
        from ldm_jax.pipelines.export import export_text_to_image
        if _EXPORT_FORMAT.value != "diffusers":
          raise UserError(f"--export_format={_EXPORT_FORMAT.value!r}: a text-to-image run "
                          "exports as diffusers / transformers folders only (diffusers)")
        out = export_text_to_image(config, _WORKDIR.value, _EXPORT.value)
      else:
        if saved is not None and "task" in saved:  # an ldm_jax run (not a diffusers folder)
          run_config.check_compatible(saved, config, _WORKDIR.value)
        out = export_first_stage(_WORKDIR.value, _EXPORT.value, _EXPORT_FORMAT.value,
                                 use_ema=bool(config.get("eval", {}).get("use_ema", False)))
      logging.getLogger("ldm_jax").info("wrote %s", out)
    elif _MODE.value == "cache_latents":
      from ldm_jax.first_stage import cache_latents
      cache_latents(config, _WORKDIR.value, _CACHE_DIR.value or "")
    else:
      from ldm_jax.evaluation.likelihood import bpd_from_workdir
      bpd_from_workdir(config, _WORKDIR.value)
  except UserError as e:
    real_stderr, sys.stderr = sys.stderr, io.StringIO()  # late background-thread noise
    print(f"error: {e}", file=real_stderr)
    real_stderr.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    # Nothing was written; skip interpreter teardown, where Orbax / TensorStore
    # background threads of a failed restore print asyncio tracebacks.
    os._exit(2)


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
