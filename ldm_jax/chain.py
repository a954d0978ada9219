"""The whole LDM chain from one command: a latent denoiser whose config carries its own
first stage (`config.first_stage`, a complete `task="autoencode"` config, e.g.
configs/mmdit_256.py:shapes) and no `data.latent_cache` trains that autoencoder into
WORKDIR/first_stage, encodes `config.first_stage.data` into the latent cache
WORKDIR/latents (`config.first_stage.cache` options) and then trains the denoiser on it.

Each link is the project's own: `train_and_evaluate` for the autoencoder,
`first_stage.cache_latents` for the cache, `train_and_evaluate` again for the denoiser.
Running the command again resumes wherever it stopped: a finished autoencoder is not
retrained, a complete cache is not re-encoded, and an encoding cut short (it writes into
WORKDIR/latents.partial, renamed to WORKDIR/latents only once complete) starts over.
`--mode=sample` / `export` read the same WORKDIR/latents and decode with
WORKDIR/first_stage (checked against the cache's fingerprint). A config whose first
stage differs from the one the workdir built is refused. `max_steps_per_run` and
SIGTERM stop the denoiser's training; the autoencoder's stage has its own
`first_stage.max_steps_per_run`, and a SIGTERM during its training stops the command
after that stage's checkpoint (run it again to go on).
"""

import logging
import os
import shutil

from ldm_jax.errors import check

logger = logging.getLogger("ldm_jax")

FIRST_STAGE_DIR = "first_stage"
LATENTS_DIR = "latents"


def uses_chain(config) -> bool:
  """True for a latent denoiser that builds its own first stage and cache."""
  return (bool(config.get("first_stage", None)) and config.data.get("source") == "latents"
          and not config.data.get("latent_cache", ""))


def chain_dirs(workdir: str) -> tuple[str, str]:
  """(autoencoder run, latent cache) directories of a chained run in `workdir`."""
  workdir = os.path.abspath(workdir)
  return os.path.join(workdir, FIRST_STAGE_DIR), os.path.join(workdir, LATENTS_DIR)


def _barrier(name: str) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def _agreed(value: bool) -> bool:
  """Process 0's answer on every process (each process looks at the file system, which
  may lag on some; all must take the same branch, or a collective hangs)."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1:
    return bool(value)
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(bool(value))))


def _check_stage(stage_config, vae_dir: str, cache_dir: str) -> None:
  """Refuses a config whose first stage differs from the one this workdir already built
  (its autoencoder's state-defining keys; the cache's store and size)."""
  from ldm_jax import run_config  # pylint: disable=import-outside-toplevel
  from ldm_jax.data.latents import MANIFEST, read_manifest  # pylint: disable=import-outside-toplevel
  run_config.check_compatible(run_config.read_saved_config(vae_dir), stage_config, vae_dir)
  if not os.path.exists(os.path.join(cache_dir, MANIFEST)):
    return
  manifest = read_manifest(cache_dir)
  cache = stage_config.get("cache", {})
  wanted = {"store": cache.get("store", "") or manifest["store"],
            "num_examples": int(cache.get("num_examples", 0)) or manifest["num_examples"]}
  differ = {k: (v, manifest[k]) for k, v in wanted.items() if v != manifest[k]}
  check(not differ, f"{cache_dir} was encoded with other first_stage.cache settings ("
        + ", ".join(f"{k}: config {a!r} vs cache {b!r}" for k, (a, b) in differ.items())
        + "); use the same settings, or a new --workdir")


def _autoencoder_done(stage_config, vae_dir: str) -> bool:
  from ldm_jax.training.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(os.path.join(vae_dir, "checkpoints")):
    return False
  checkpointer = Checkpointer(vae_dir, read_only=True)
  try:
    latest = checkpointer.latest_step()
  finally:
    checkpointer.close()
  return latest is not None and latest >= int(stage_config.num_train_steps)


def build_first_stage(config, workdir: str) -> str:
  """Trains (or resumes) the autoencoder of `config.first_stage` and encodes its data
  into the chain's latent cache unless that is complete; returns the cache directory,
  or None when the autoencoder stopped before its last step (preempted: run again)."""
  from ldm_jax.data.latents import MANIFEST  # pylint: disable=import-outside-toplevel
  from ldm_jax.first_stage import cache_latents  # pylint: disable=import-outside-toplevel
  from ldm_jax.train import train_and_evaluate  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  stage_config = config.first_stage
  check(stage_config.get("task", "") == "autoencode",
        f"config.first_stage must be an autoencoder's config (task 'autoencode'), got task "
        f"{stage_config.get('task', '')!r}")
  vae_dir, cache_dir = chain_dirs(workdir)
  _check_stage(stage_config, vae_dir, cache_dir)
  if _agreed(os.path.exists(os.path.join(cache_dir, MANIFEST))):
    logger.info("first stage: latent cache %s is complete", cache_dir)
    return cache_dir
  check(not _agreed(os.path.exists(cache_dir)),
        f"{cache_dir} exists but holds no complete latent cache (no {MANIFEST}); this "
        "chain writes its cache there itself: move it away and run again")
  if _agreed(_autoencoder_done(stage_config, vae_dir)):
    logger.info("first stage: autoencoder %s is trained", vae_dir)
  else:
    logger.info("first stage: training the %s/%s autoencoder in %s",
                stage_config.model.name, stage_config.model.variant, vae_dir)
    train_and_evaluate(stage_config, vae_dir)
    _barrier("ldm_jax chain: autoencoder trained")
    if not _agreed(_autoencoder_done(stage_config, vae_dir)):  # stopped early (SIGTERM, step cap)
      logger.info("first stage: the autoencoder stopped before step %d; run the same "
                  "command again to resume", int(stage_config.num_train_steps))
      return None
  partial = cache_dir + ".partial"
  if jax.process_index() == 0 and os.path.exists(partial):
    logger.info("first stage: removing the incomplete encoding %s", partial)
    shutil.rmtree(partial)
  _barrier("ldm_jax chain: partial cache removed")
  cache_latents(stage_config, vae_dir, partial)
  if jax.process_index() == 0:
    os.replace(partial, cache_dir)
  _barrier("ldm_jax chain: cache in place")
  return cache_dir


def resolve(config, workdir: str, mode: str):
  """The config with `data.latent_cache` pointing at the chain's cache (built first when
  `mode` is "train"; None if that stopped early); other configs unchanged."""
  if not uses_chain(config):
    return config
  from ldm_jax.data.latents import MANIFEST  # pylint: disable=import-outside-toplevel
  if mode == "train":
    cache_dir = build_first_stage(config, workdir)
    if cache_dir is None:
      return None
  else:
    cache_dir = chain_dirs(workdir)[1]
    check(os.path.exists(os.path.join(cache_dir, MANIFEST)),
          f"--mode={mode}: {workdir} has no latent cache {cache_dir} yet; this config builds "
          "its first stage when it trains: run --mode=train first")
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.latent_cache = cache_dir
    if not config.data.get("vae", ""):  # decode with this workdir's autoencoder, even
      config.data.vae = chain_dirs(workdir)[0]  # after the workdir moved (fingerprinted)
  return config
