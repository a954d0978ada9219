"""Sampling: restore the (EMA) parameters, run the configured sampler with
classifier-free guidance (and optionally classifier guidance) in batches, write a PNG grid and `samples.npz`
(`arr_0` uint8 NHWC, `arr_1` int labels: the ADM / DiT evaluator convention)."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ldm_jax.data.text import is_shapes_text, is_text, null_condition, prompt_condition
from ldm_jax.diffusion.classifier_guidance import check_guided_sampler, make_cond_fn
from ldm_jax.diffusion.guidance import guided_model_fn
from ldm_jax.diffusion.samplers import check_sample_config, run_sampler
from ldm_jax.errors import check
from ldm_jax.models.noisy_classifier import logits_fn
from ldm_jax.models.registry import model_labels
from ldm_jax.training.metrics import image_grid

logger = logging.getLogger("ldm_jax")


def to_uint8(images):
  """[-1, 1] float -> uint8 [0, 255]."""
  return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def make_sample_fn(model, process, data_config, sample_config, classifier=None, decoder=None):
  """A jitted `(params, labels (B,), key, classifier_params=None, decoder_params=None)
  -> uint8 images (B, H, W, C)`; for a text-to-image run the labels are its condition
  dict ({"tokens": (B, L)}, see ldm_jax/data/text.py).

  With a `decoder` (the first-stage autoencoder module of a denoiser trained on a
  latent cache; see ldm_jax/first_stage.py) the sampler runs in latent space and the
  samples are decoded with `decoder_params` into images.

  Classifier-free guidance (`sample.guidance_scale`, `guidance_rescale`,
  `guidance_interval`) is folded into the model function; with a `classifier` module
  (a task=classify run) and `sample.classifier_scale` s, classifier guidance
  s·∇ log p(y | x_t) is passed to the sampler as its `cond_fn` (s = 0: no cond_fn,
  so the result is exactly the unguided sampler's).
  """
  shape_hw = (data_config.image_size, data_config.image_size, data_config.channels)
  classifier_scale = float(sample_config.get("classifier_scale", 0.0))
  # The unconditional input of classifier-free guidance: the null class, or for a
  # text-to-image model the empty prompt's condition.
  null = null_condition(data_config) if is_text(data_config) else model.null_class

  @jax.jit
  def sample_fn(params, labels, key, classifier_params=None, decoder_params=None):
    def network_fn(x, t, y):
      return model.apply({"params": params}, x, t, model_labels(model, y))
    # What the samplers integrate: the process's prediction as such (ε / v / x0 for the
    # Gaussian process), or for rectified flow the velocity (from an x0 output too).
    apply_fn = process.wrap_model(network_fn) if hasattr(process, "wrap_model") else network_fn
    model_fn = guided_model_fn(apply_fn, labels, null,
                               float(sample_config.guidance_scale),
                               int(sample_config.get("guided_channels", 0)) or data_config.channels,
                               rescale=float(sample_config.get("guidance_rescale", 0.0)),
                               interval=tuple(sample_config.get("guidance_interval", ())))
    cond_fn = None
    if classifier is not None and classifier_params is not None and classifier_scale != 0:
      cond_fn = make_cond_fn(logits_fn(classifier, classifier_params), labels, classifier_scale)
    batch = jax.tree_util.tree_leaves(labels)[0].shape[0]
    x = run_sampler(process, model_fn, (batch,) + shape_hw, key, sample_config,
                    cond_fn=cond_fn)
    if decoder is not None:
      from ldm_jax.first_stage import decode_latents
      x = decode_latents(decoder, decoder_params, x)
    return to_uint8(x)

  return sample_fn


def sample_prompts(config) -> list[str]:
  """The prompts of `--mode=sample` for a text-to-image run: `sample.prompts` (a file,
  one prompt per line), else for the built-in shapes the held-out prompts (never seen
  verbatim in training): `sample.num` images, the first half cycling over the one-shape
  prompts, the second half over the two-shape ones."""
  path = config.sample.get("prompts", "")
  if path:
    from ldm_jax.data.shapes import read_prompts_file
    return read_prompts_file(path)
  check(is_shapes_text(config.data), "sample.prompts: give a prompts file (one prompt per "
        "line) to sample a text-to-image model")
  from ldm_jax.data.shapes import heldout_prompts
  one, two = heldout_prompts("one"), heldout_prompts("two")
  num = int(config.sample.num)
  return [one[i % len(one)] for i in range(num // 2)] + [two[i % len(two)]
                                                          for i in range(num - num // 2)]


def grid_prompts(config, count: int = 16) -> list[str]:
  """The prompts of the training-time sample grid: the first `count` / 2 of each half of
  `sample_prompts` (shapes: one-shape, then two-shape prompts)."""
  prompts = sample_prompts(config)
  half = len(prompts) // 2
  if half < count // 2:
    return prompts[:count]
  return prompts[:count // 2] + prompts[half:half + count - count // 2]


def to_host(images) -> np.ndarray:
  """A (possibly multi-process sharded) array as one numpy array on every process."""
  if getattr(images, "is_fully_addressable", True):
    return np.asarray(images)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(images, tiled=True))


def sample_labels(num: int, num_classes: int, given=()) -> np.ndarray:
  """Balanced labels (0, 1, …, C-1, 0, …) or the given labels cycled, length `num`."""
  pattern = np.asarray(list(given) if len(given) else np.arange(num_classes), np.int32)
  return np.resize(pattern, num)


def generate(sample_fn, params, labels: np.ndarray, batch_size: int, key,
             classifier_params=None, decoder_params=None) -> np.ndarray:
  """Runs `sample_fn` over `labels` in fixed-size batches (the last one padded, so one
  compiled program serves every batch); returns uint8 (N, H, W, C)."""
  num = len(jax.tree_util.tree_leaves(labels)[0])
  out = []
  batches = -(-num // batch_size)
  for b in range(batches):
    rows = np.resize(np.arange(b * batch_size, min((b + 1) * batch_size, num)), batch_size)
    padded = jax.tree_util.tree_map(lambda a, rows=rows: jnp.asarray(np.asarray(a)[rows]),
                                    labels)
    images = sample_fn(params, padded, jax.random.fold_in(key, b),
                       classifier_params, decoder_params)
    out.append(to_host(images)[:min(batch_size, num - b * batch_size)])
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


def write_outputs(out_dir: str, images: np.ndarray, labels, columns: int):
  """Writes grid.png and samples.npz into a new directory `out_dir`: `arr_0` the
  images and `arr_1` the int labels, or for prompts (a list of str) `prompts`."""
  os.makedirs(out_dir)
  if isinstance(labels, list):
    np.savez(os.path.join(out_dir, "samples.npz"), arr_0=images, prompts=np.asarray(labels))
  else:
    np.savez(os.path.join(out_dir, "samples.npz"), arr_0=images,
             arr_1=labels.astype(np.int64))
  grid = image_grid(images[:min(len(images), columns * columns)], columns)
  Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid).save(
      os.path.join(out_dir, "grid.png"))


def output_name(step: int, sample_config) -> str:
  classifier = (f"_cg{sample_config.classifier_scale:g}"
                if sample_config.get("classifier_workdir", "") else "")
  steps = sample_config.get("respacing", "") or sample_config.num_steps  # respacing wins
  return (f"step{step}_{sample_config.sampler}{steps}"
          f"_cfg{sample_config.guidance_scale:g}{classifier}_seed{sample_config.seed}")


def load_classifier(config, process, mesh):
  """The classifier of `config.sample.classifier_workdir` (a task=classify run) for
  classifier guidance: returns (module, params) (EMA params unless
  `sample.classifier_use_ema` is False), or (None, None) when none is configured.

  Its config.json must describe a classifier of the same image size, channels and
  classes, trained on a process with the same noise schedule as `process` (the
  classifier only ever saw x_t of its own schedule)."""
  import ml_collections
  from ldm_jax import run_config
  from ldm_jax.diffusion import build_process
  from ldm_jax.diffusion.gaussian import GaussianDiffusion
  from ldm_jax.models import build_model
  from ldm_jax.training import sharding
  from ldm_jax.training.checkpoint import Checkpointer
  from ldm_jax.training.optimizer import make_optimizer
  from ldm_jax.training.train_state import create_state

  where = config.sample.get("classifier_workdir", "")
  if not where:
    return None, None
  scale = config.sample.get("classifier_scale", 0.0)
  check(scale >= 0, f"sample.classifier_scale must be >= 0, got {scale}")
  check_guided_sampler(config.diffusion.process, config.sample.sampler)
  path = os.path.abspath(where)
  check(os.path.isdir(path), f"sample.classifier_workdir {where!r} does not exist; give the "
                             f"--workdir of a run trained with task='classify'")
  checkpointer = Checkpointer(path, read_only=True)
  try:
    step = checkpointer.latest_step()
    check(step is not None, f"sample.classifier_workdir {where!r} holds no checkpoint; "
                            f"train the classifier first (task='classify')")
    saved = run_config.read_saved_config(path) or checkpointer.restore_config(step)
    check(saved is not None, f"sample.classifier_workdir {where!r} has no config.json")
    saved_task = saved.get("task", "denoise")
    check(saved_task == "classify",
          f"sample.classifier_workdir {where!r} holds a task={saved_task!r} run; classifier "
          f"guidance needs a run trained with task='classify'")
    data = saved.get("data", {})
    for key in ("image_size", "channels", "num_classes"):
      check(data.get(key) == config.data[key],
            f"sample.classifier_workdir {where!r}: its classifier has data.{key}="
            f"{data.get(key)!r} but this denoiser has data.{key}={config.data[key]!r}")
    theirs = ml_collections.ConfigDict(saved.get("diffusion", {}))
    differing = sorted(k for k in set(theirs) | set(config.diffusion)
                       if theirs.get(k, "<absent>") != config.diffusion.get(k, "<absent>"))
    clf_process = build_process(theirs, config.data.image_size)
    same = (isinstance(clf_process, GaussianDiffusion) and isinstance(process, GaussianDiffusion)
            and np.array_equal(clf_process.alphas_cumprod, process.alphas_cumprod))
    check(same, f"sample.classifier_workdir {where!r}: the classifier was trained on a "
                f"different diffusion process (differing diffusion keys, classifier vs "
                f"denoiser: " + "; ".join(f"{k}: {theirs.get(k, '<absent>')!r} vs "
                                          f"{config.diffusion.get(k, '<absent>')!r}"
                                          for k in differing[:8]) +
                "); train it with the denoiser's diffusion settings")
    model_config = ml_collections.ConfigDict(saved["model"])
    data_config = ml_collections.ConfigDict(data)
    classifier = build_model(model_config, input_size=data_config.image_size,
                             in_channels=data_config.channels,
                             num_classes=data_config.num_classes)
    tx = make_optimizer(ml_collections.ConfigDict(saved["optim"]), saved["num_train_steps"])
    with jax.set_mesh(mesh):
      abstract, _ = create_state(classifier, tx, data_config, saved.get("seed", 0), mesh,
                                 sharding.logical_rules(config.mesh, mesh), materialize=False)
      state = checkpointer.restore(abstract, step=step)
  finally:
    checkpointer.close()
  use_ema = config.sample.get("classifier_use_ema", True)
  logger.info("classifier guidance: %s step %d (%s params), scale %g", path, step,
              "EMA" if use_ema else "raw", scale)
  return classifier, (state.ema_params if use_ema else state.params)


def restore_for_inference(config, workdir: str, mode: str):
  """Validates `config` against `workdir` and restores its latest checkpoint for an
  inference mode ("sample", "bpd"). Returns (model, process, mesh, params, step);
  `params` are the EMA weights when `sample.use_ema`. Fails with a UserError, before
  anything is written, when the workdir is missing / unwritable / has no checkpoint or
  was trained with an incompatible config."""
  from ldm_jax import run_config
  from ldm_jax.diffusion import build_process
  from ldm_jax.models import build_model
  from ldm_jax.training import sharding
  from ldm_jax.training.checkpoint import Checkpointer
  from ldm_jax.training.optimizer import make_optimizer
  from ldm_jax.training.train_state import create_state

  run_config.validate(config)
  check(run_config.task_of(config) == "denoise",
        f"--mode={mode} needs a denoiser run (task='denoise'); this config has "
        f"task={run_config.task_of(config)!r} (a noisy classifier is used through "
        f"sample.classifier_workdir of a denoiser run)")
  workdir = run_config.prepare_workdir(workdir, create=False)
  check(os.path.isdir(workdir), f"--workdir {workdir!r} does not exist: nothing to {mode} "
                                f"from (train first with --mode=train)")
  check(os.access(workdir, os.W_OK | os.X_OK),
        f"--workdir {workdir!r} is not writable: results could not be saved there")
  checkpointer = Checkpointer(workdir, read_only=True)
  try:
    step = checkpointer.latest_step()
    check(step is not None, f"--mode={mode}: no checkpoint in {checkpointer.directory}; "
                            f"train first with --mode=train --workdir={workdir}")
    saved = run_config.read_saved_config(workdir) or checkpointer.restore_config()
    run_config.check_compatible(saved, config, workdir)
    mesh = sharding.make_mesh(config.mesh)
    model = build_model(config.model, input_size=config.data.image_size,
                        in_channels=config.data.channels, num_classes=config.data.num_classes)
    process = build_process(config.diffusion, config.data.image_size)
    if mode == "sample":
      check_sample_config(process, config.sample)
    tx = make_optimizer(config.optim, config.num_train_steps)
    with jax.set_mesh(mesh):
      abstract, _ = create_state(model, tx, config.data, config.seed, mesh,
                                 sharding.logical_rules(config.mesh, mesh), materialize=False)
      state = checkpointer.restore(abstract, step=step)
  finally:
    checkpointer.close()
  params = state.ema_params if config.sample.use_ema else state.params
  return model, process, mesh, params, step


def sample_from_workdir(config, workdir: str) -> str:
  """`--mode=sample`: restores the latest checkpoint of `workdir`, generates
  `config.sample.num` images and writes them to a new directory; returns its path."""
  model, process, mesh, params, step = restore_for_inference(config, workdir, "sample")
  classifier, classifier_params = load_classifier(config, process, mesh)
  from ldm_jax.first_stage import decoder_for, source_is_mnist
  stage = decoder_for(config)  # latent denoisers: the autoencoder that decodes samples
  with jax.set_mesh(mesh):
    if is_text(config.data):
      labels = sample_prompts(config)
      cond = prompt_condition(config.data, labels)
    else:
      labels = cond = sample_labels(config.sample.num, config.data.num_classes,
                                    config.sample.labels)
    sample_fn = make_sample_fn(model, process, config.data, config.sample, classifier,
                               decoder=stage.model if stage else None)
    images = generate(sample_fn, params, cond, config.sample.batch_size,
                      jax.random.key(config.sample.seed), classifier_params,
                      stage.params if stage else None)
  out_dir = unique_dir(os.path.join(workdir, "samples", output_name(step, config.sample)))
  write_outputs(out_dir, images, labels, columns=8 if is_text(config.data)
                else min(config.data.num_classes, 16))
  logger.info("wrote %d samples to %s", len(images), out_dir)
  if config.sample.judge and is_shapes_text(config.data):
    from ldm_jax.evaluation.shapes_judge import judge_samples
    logger.info("shapes judge: %s", judge_samples(images, labels, out_dir))
  elif config.sample.judge and source_is_mnist(config.data):
    from ldm_jax.evaluation.mnist_judge import judge_samples
    report = judge_samples(images, labels, out_dir)
    logger.info("judge: %s", report)
  return out_dir
