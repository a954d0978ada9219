"""train_and_evaluate(config, workdir): the one training loop, read top to bottom.

Every model / process / data source is reached through the config; nothing here
knows which. Sections follow the data path in ARCHITECTURE.md.
"""

import functools
import json
import logging
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from clu import parameter_overview
from PIL import Image

from ldm_jax import run_config
from ldm_jax.data.pipeline import make_train_iterator
from ldm_jax.diffusion.samplers import check_sample_config
from ldm_jax.errors import UserError
from ldm_jax.models import count_params
from ldm_jax.data.text import cached_grid_condition, is_shapes_text, is_text, prompt_condition
from ldm_jax.sample import grid_prompts, make_sample_fn, to_host
from ldm_jax.training import sharding
from ldm_jax.training.checkpoint import Checkpointer
from ldm_jax.training.metrics import MetricWriter, Progress, image_grid
from ldm_jax.training.setup import build_training
from ldm_jax.training.step import to_model_range

logger = logging.getLogger("ldm_jax")


def grid_classes(num_classes: int, at_most: int = 16) -> np.ndarray:
  """The classes shown in sample grids: all of them, or `at_most` evenly spread."""
  return np.unique(np.linspace(0, num_classes - 1, min(num_classes, at_most)).round().astype(int))


def log_sample_grid(sample_fn, params, config, step, writer, workdir):
  """Samples `grid_per_class` images per class with EMA params (a text-to-image run:
  one image for each of 16 sample prompts, scored by the shapes judge for the built-in
  shapes); TensorBoard + PNG."""
  if is_text(config.data):
    cached = cached_grid_condition(config.data)
    if cached is not None:  # a text-embedding cache: its first captions, no encoder loaded
      prompts, cond = cached
    else:
      prompts = grid_prompts(config)
      cond = prompt_condition(config.data, prompts)
    images = to_host(sample_fn(params, cond, jax.random.key(config.sample.seed)))
    grid = image_grid(images, 8)
    if is_shapes_text(config.data):
      from ldm_jax.evaluation.shapes_judge import score
      result = score(images, prompts)
      writer.scalars(step, {"eval/shapes_accuracy": result["accuracy"]})
      logger.info("shapes judge on %d grid samples at step %d: %.0f %% correct", len(images),
                  step, 100 * result["accuracy"])
  else:
    per_class = config.eval.grid_per_class
    classes = grid_classes(config.data.num_classes)
    labels = np.repeat(classes, per_class).astype(np.int32)
    images = to_host(sample_fn(params, labels, jax.random.key(config.sample.seed)))
    # One column per class, one row per sample index.
    grid = image_grid(images.reshape(len(classes), per_class, *images.shape[1:])
                      .transpose(1, 0, 2, 3, 4).reshape(images.shape), len(classes))
  writer.image(step, "samples/ema", grid)
  if jax.process_index() == 0:
    os.makedirs(os.path.join(workdir, "grids"), exist_ok=True)
    Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid).save(
        os.path.join(workdir, "grids", f"step_{step:07d}.png"))


def classifier_accuracy(model, process, params, images_uint8, labels, times, seed: int = 0,
                        batch_size: int = 500) -> dict:
  """Accuracy of a noisy classifier on real images noised to each process time in
  `times` (one fixed noise draw per time); returns {time: accuracy}."""
  dtype = jax.eval_shape(lambda k: process.sample_time(k, 1), jax.random.key(0)).dtype

  @jax.jit
  def correct(params, x0_uint8, y, t, key):
    x0 = to_model_range(x0_uint8)
    t = jnp.full((x0.shape[0],), t, dtype)
    x_t = process.add_noise(x0, jax.random.normal(key, x0.shape, x0.dtype), t)
    logits = model.apply({"params": params}, x_t, process.model_time(t))
    return (jnp.argmax(logits, -1) == y).sum()

  out = {}
  for t in times:
    hits = 0
    for start in range(0, len(labels), batch_size):
      key = jax.random.fold_in(jax.random.key(seed), start)
      hits += int(correct(params, images_uint8[start:start + batch_size],
                          labels[start:start + batch_size], t, key))
    out[t] = hits / len(labels)
  return out


def log_classifier_eval(model, process, params, config, step, writer, workdir):
  """For task=classify (instead of sample grids): EMA-classifier accuracy on the
  held-out split at the noise levels `config.eval.classifier_timesteps`; TensorBoard
  scalars `eval/accuracy_t{t}` and `classifier_eval.json` in the workdir."""
  if config.data.source != "mnist":
    logger.info("task=classify: no held-out split for data.source=%r; skipping the "
                "accuracy-vs-noise evaluation", config.data.source)
    return
  from ldm_jax.data.builtin import load_mnist
  images, labels = load_mnist("heldout")
  times = tuple(config.eval.get("classifier_timesteps", (0,)))
  accuracy = classifier_accuracy(model, process, params, images, labels, times, config.seed)
  writer.scalars(step, {f"eval/accuracy_t{t}": a for t, a in accuracy.items()})
  logger.info("held-out accuracy of the EMA classifier at step %d by timestep: %s", step,
              ", ".join(f"t={t}: {100 * a:.1f} %" for t, a in accuracy.items()))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "classifier_eval.json"), "w") as f:
      json.dump({"step": step, "heldout_accuracy_by_timestep":
                 {str(t): a for t, a in accuracy.items()}}, f, indent=2)


def eval_images(config) -> np.ndarray:
  """uint8 images a reconstruction is evaluated on: the held-out MNIST split for the
  built-in data, else the first `eval.num_images` of `eval.split` of the source."""
  from ldm_jax.data.pipeline import make_source
  source = make_source(config.data, "heldout" if config.data.source == "mnist"
                       else config.eval.get("split", "validation"))
  count = min(len(source), int(config.eval.get("num_images", 500)))
  return np.stack([source[i]["image"] for i in range(count)])


def log_reconstruction_eval(model, state, frozen, config, step, writer, workdir):
  """For task=autoencode: PSNR / SSIM / LPIPS (with weights) / codebook usage of
  held-out reconstructions (EMA weights if eval.use_ema), TensorBoard scalars
  `eval/*`, a grid (originals over reconstructions) and `reconstruction_eval.json`."""
  from ldm_jax.training.autoencoder import reconstruction_metrics
  images = eval_images(config)
  params = state.ema_params if config.eval.get("use_ema", False) else state.params
  metrics, recons = reconstruction_metrics(model, params, frozen, images)
  writer.scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
  logger.info("held-out reconstructions of %d images at step %d: %s", len(images), step,
              ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
  shown = min(16, len(images))
  grid = image_grid(np.concatenate([images[:shown], recons[:shown]]), shown)
  writer.image(step, "reconstructions", grid)
  if jax.process_index() == 0:
    os.makedirs(os.path.join(workdir, "grids"), exist_ok=True)
    Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid).save(
        os.path.join(workdir, "grids", f"reconstructions_{step:07d}.png"))
    with open(os.path.join(workdir, "reconstruction_eval.json"), "w") as f:
      json.dump({"step": step, "num_images": len(images),
                 "weights": "ema" if config.eval.get("use_ema", False) else "raw",
                 **metrics}, f, indent=2)


def train_and_evaluate(config, workdir: str):
  """Trains `config` in `workdir`, resuming from its latest checkpoint if present.

  SIGTERM (preemption, `scancel`, a TPU maintenance event) finishes the current step,
  commits a checkpoint and returns normally; running the same command resumes.
  Returns the final TrainState.
  """
  # SIGTERM from here on (also while restoring or compiling) stops after the next step.
  with PreemptionFlag() as preempted:
    return _train_and_evaluate(config, workdir, preempted)


def _train_and_evaluate(config, workdir: str, preempted: "PreemptionFlag"):
  # -- 1. config (all of it checked before anything is written) and workdir ----
  setup = build_training(config)
  task, model, process, mesh = setup.task, setup.model, setup.process, setup.mesh
  stage = None
  if task == "denoise":
    check_sample_config(process, config.sample)  # fail now, not after hours of training
    from ldm_jax.first_stage import decoder_for
    stage = decoder_for(config)  # latent denoisers: the autoencoder that decodes samples
  frozen = setup.load_frozen()  # frozen networks the step reads (LPIPS), else {}
  nan_policy = config.optim.get("nan_policy", "stop")
  workdir = run_config.prepare_workdir(workdir)
  checkpointer = Checkpointer(workdir, config.ckpt.max_to_keep,
                              keep_every=int(config.ckpt.get("keep_every_steps", 0)))
  saved = run_config.read_saved_config(workdir) or checkpointer.restore_config()
  run_config.check_compatible(saved, config, workdir)

  # -- 2. data ----------------------------------------------------------------
  data_iter = make_train_iterator(config.data, config.data.batch_size, config.seed)

  # -- 3. state: born sharded, or restored (into an abstract target) ----------
  if checkpointer.latest_step() is not None:
    state = checkpointer.restore(setup.abstract_state, data_iter)
  else:
    state = setup.init_state()
  if jax.process_index() == 0:  # only once the run is known to be resumable
    run_config.write_config(workdir, config)
  start_step = int(state.step)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "parameters.txt"), "w") as f:
      f.write(parameter_overview.get_parameter_overview(state.params, include_stats=False))
  logger.info("task %s, model %s/%s: %s parameters; process %s; mesh %s; starting at step %d "
              "of %d", task, config.model.name, config.model.variant,
              f"{count_params(state.params):,}",
              config.diffusion.process if process is not None else "-", dict(mesh.shape),
              start_step, config.num_train_steps)

  # -- 4. the jitted step and sampler -----------------------------------------
  train_step = setup.jit_step()
  if task == "autoencode":

    def evaluate(state, step):
      log_reconstruction_eval(model, state, frozen, config, step, writer, workdir)
  elif task == "denoise":
    sample_fn = make_sample_fn(model, process, config.data, config.sample,
                               decoder=stage.model if stage else None)
    if stage is not None:
      sample_fn = functools.partial(
          sample_fn, decoder_params=jax.device_put(stage.params, sharding.replicated(mesh)))

    def evaluate(state, step):
      log_sample_grid(sample_fn, state.ema_params, config, step, writer, workdir)
  else:  # a classifier has nothing to sample: its held-out accuracy instead

    def evaluate(state, step):
      log_classifier_eval(model, process, state.ema_params, config, step, writer, workdir)
  writer = MetricWriter(os.path.join(workdir, "tensorboard"), jax.process_index() == 0)

  # -- 5. the loop --------------------------------------------------------------
  stop_at = config.num_train_steps
  if config.max_steps_per_run > 0:
    stop_at = min(stop_at, start_step + config.max_steps_per_run)
  progress = Progress(config.num_train_steps, start_step)
  pending = []  # device metrics since the last report: no host sync inside the loop
  step = start_step
  started = time.time()
  try:
    with jax.set_mesh(mesh):
      while step < stop_at:
        batch = sharding.put_batch(next(data_iter), setup.batch_sharding)
        state, metrics = train_step(state, batch, frozen)
        pending.append(metrics)
        step += 1
        stopping = preempted.is_set(step)
        save_now = step % config.ckpt.every_steps == 0 or step == stop_at or stopping
        if step % config.log_every_steps == 0 or save_now:
          fetched = jax.device_get(pending)  # the one host sync per report
          if nan_policy == "stop":
            check_finite(fetched, step - len(fetched) + 1)  # before a checkpoint holds NaNs
          means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
          if "skipped" in means:
            means["skipped"] = float(np.sum([m["skipped"] for m in fetched]))
          means.update(progress.report(step, means))
          writer.scalars(step, means)
          pending = []
        if save_now:
          checkpointer.save(step, state, data_iter, run_config.config_to_dict(config), force=True)
        if stopping:
          logger.info("SIGTERM: stopped after step %d with a checkpoint; run the same command "
                      "to resume", step)
          break
        if (config.eval.every_steps and step % config.eval.every_steps == 0
            and step < config.num_train_steps):
          evaluate(state, step)
      if step == config.num_train_steps and step > start_step:  # (after its checkpoint)
        evaluate(state, step)
    logger.info("trained %d steps in %.1f s", step - start_step, time.time() - started)
  finally:  # also on errors: finish in-flight checkpoint writes, flush events
    checkpointer.close()
    writer.close()
  return state


class PreemptionFlag:
  """SIGTERM while training (a context manager) asks the loop to stop cleanly.

  One process: a Python SIGTERM handler sets the flag. Several processes: every
  process must stop after the same step, so JAX's preemption service (started by
  `jax.distributed.initialize`, which catches SIGTERM itself) agrees on that step and
  `is_set` turns True on all processes together.
  """

  def __init__(self):
    self._received = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
    return False

  def _handle(self, signum, frame):
    del signum, frame
    self._received = True

  def is_set(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self._received
    from jax.experimental import multihost_utils
    return bool(multihost_utils.reached_preemption_sync_point(step))


def check_finite(per_step_metrics: list, first_step: int):
  """Stops a diverged run before it writes a NaN checkpoint, naming the first step and
  metric that went non-finite."""
  for offset, metrics in enumerate(per_step_metrics):
    bad = [k for k, v in metrics.items() if not np.all(np.isfinite(v))]
    if bad:
      raise UserError(
          f"training diverged at step {first_step + offset}: {bad[0]} = "
          f"{float(np.asarray(metrics[bad[0]]))} (non-finite: {bad}); the last checkpoint is "
          f"kept. Lower optim.learning_rate, raise optim.warmup_steps, or set "
          f"optim.nan_policy=skip to skip such updates")
