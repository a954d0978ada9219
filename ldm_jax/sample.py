"""Sampling: restore the (EMA) parameters, run the configured sampler with
classifier-free guidance in batches, write a PNG grid and `samples.npz`
(`arr_0` uint8 NHWC, `arr_1` int labels: the ADM / DiT evaluator convention)."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ldm_jax.diffusion.guidance import guided_model_fn
from ldm_jax.diffusion.samplers import check_sample_config, run_sampler
from ldm_jax.errors import check
from ldm_jax.training.metrics import image_grid

logger = logging.getLogger("ldm_jax")


def to_uint8(images):
  """[-1, 1] float -> uint8 [0, 255]."""
  return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def make_sample_fn(model, process, data_config, sample_config):
  """A jitted `(params, labels (B,), key) -> uint8 images (B, H, W, C)`."""
  shape_hw = (data_config.image_size, data_config.image_size, data_config.channels)

  @jax.jit
  def sample_fn(params, labels, key):
    def apply_fn(x, t, y):
      return model.apply({"params": params}, x, t, y)
    model_fn = guided_model_fn(apply_fn, labels, model.null_class,
                               float(sample_config.guidance_scale), data_config.channels)
    x = run_sampler(process, model_fn, (labels.shape[0],) + shape_hw, key, sample_config)
    return to_uint8(x)

  return sample_fn


def sample_labels(num: int, num_classes: int, given=()) -> np.ndarray:
  """Balanced labels (0, 1, …, C-1, 0, …) or the given labels cycled, length `num`."""
  pattern = np.asarray(list(given) if len(given) else np.arange(num_classes), np.int32)
  return np.resize(pattern, num)


def generate(sample_fn, params, labels: np.ndarray, batch_size: int, key) -> np.ndarray:
  """Runs `sample_fn` over `labels` in fixed-size batches (the last one padded, so one
  compiled program serves every batch); returns uint8 (N, H, W, C)."""
  num = len(labels)
  out = []
  batches = -(-num // batch_size)
  for b in range(batches):
    chunk = labels[b * batch_size:(b + 1) * batch_size]
    padded = np.resize(chunk, batch_size) if len(chunk) < batch_size else chunk
    images = sample_fn(params, jnp.asarray(padded), jax.random.fold_in(key, b))
    out.append(np.asarray(images)[:len(chunk)])
    logger.info("sampling: batch %d/%d (%d/%d images)", b + 1, batches,
                min((b + 1) * batch_size, num), num)
  return np.concatenate(out)


def unique_dir(path: str) -> str:
  """`path`, or `path-1`, `path-2`, … : never reuse (overwrite) an existing output."""
  candidate, n = path, 0
  while os.path.exists(candidate):
    n += 1
    candidate = f"{path}-{n}"
  return candidate


def write_outputs(out_dir: str, images: np.ndarray, labels: np.ndarray, columns: int):
  """Writes grid.png and samples.npz into a new directory `out_dir`."""
  os.makedirs(out_dir)
  np.savez(os.path.join(out_dir, "samples.npz"), arr_0=images, arr_1=labels.astype(np.int64))
  grid = image_grid(images[:min(len(images), columns * columns)], columns)
  Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid).save(
      os.path.join(out_dir, "grid.png"))


def output_name(step: int, sample_config) -> str:
  return (f"step{step}_{sample_config.sampler}{sample_config.num_steps}"
          f"_cfg{sample_config.guidance_scale:g}_seed{sample_config.seed}")


def sample_from_workdir(config, workdir: str) -> str:
  """`--mode=sample`: restores the latest checkpoint of `workdir`, generates
  `config.sample.num` images and writes them to a new directory; returns its path."""
  from ldm_jax import run_config
  from ldm_jax.diffusion import build_process
  from ldm_jax.models import build_model
  from ldm_jax.training import sharding
  from ldm_jax.training.checkpoint import Checkpointer
  from ldm_jax.training.optimizer import make_optimizer
  from ldm_jax.training.train_state import create_state

  run_config.validate(config)
  workdir = run_config.prepare_workdir(workdir, create=False)
  check(os.path.isdir(workdir), f"--workdir {workdir!r} does not exist: nothing to sample from "
                                f"(train first with --mode=train)")
  check(os.access(workdir, os.W_OK | os.X_OK),
        f"--workdir {workdir!r} is not writable: samples could not be saved there")
  checkpointer = Checkpointer(workdir, read_only=True)
  step = checkpointer.latest_step()
  check(step is not None, f"--mode=sample: no checkpoint in {checkpointer.directory}; "
                          f"train first with --mode=train --workdir={workdir}")
  saved = run_config.read_saved_config(workdir) or checkpointer.restore_config()
  run_config.check_compatible(saved, config, workdir)

  mesh = sharding.make_mesh(config.mesh)
  model = build_model(config.model, input_size=config.data.image_size,
                      in_channels=config.data.channels, num_classes=config.data.num_classes)
  process = build_process(config.diffusion)
  check_sample_config(process, config.sample)
  tx = make_optimizer(config.optim, config.num_train_steps)
  with jax.set_mesh(mesh):
    abstract, _ = create_state(model, tx, config.data, config.seed, mesh,
                               sharding.logical_rules(config.mesh), materialize=False)
    state = checkpointer.restore(abstract, step=step)
    params = state.ema_params if config.sample.use_ema else state.params
    labels = sample_labels(config.sample.num, config.data.num_classes, config.sample.labels)
    sample_fn = make_sample_fn(model, process, config.data, config.sample)
    images = generate(sample_fn, params, labels, config.sample.batch_size,
                      jax.random.key(config.sample.seed))
  out_dir = unique_dir(os.path.join(workdir, "samples", output_name(step, config.sample)))
  write_outputs(out_dir, images, labels, columns=min(config.data.num_classes, 16))
  logger.info("wrote %d samples to %s", len(images), out_dir)
  if config.sample.judge and config.data.source == "mnist":
    from ldm_jax.evaluation.mnist_judge import judge_samples
    report = judge_samples(images, labels, out_dir)
    logger.info("judge: %s", report)
  checkpointer.close()
  return out_dir
