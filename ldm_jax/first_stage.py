"""The frozen first stage of a latent diffusion model: an autoencoder restored from an
ldm_jax autoencode run (or a local diffusers AutoencoderKL / VQModel folder), the
command that encodes a dataset into a latent cache once, and the decoder that turns
a latent denoiser's samples back into images.

  # 1. train the autoencoder          (configs/vae_mnist.py, task "autoencode")
  # 2. encode the data into a cache:
  python -m ldm_jax.main --mode=cache_latents --config=configs/vae_mnist.py \
      --workdir=runs/vae_kl --cache_dir=runs/mnist_latents
  # 3. train a denoiser on it         (configs/ldm_mnist.py: data.source = "latents")

The cache's manifest names the autoencoder (path, config, factors) and its
fingerprint (`ldm_jax.data.latents.vae_fingerprint`); decoding refuses an autoencoder
with another fingerprint.
"""

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_jax.errors import UserError, check

logger = logging.getLogger("ldm_jax")


@dataclasses.dataclass(frozen=True)
class FirstStage:
  """A restored autoencoder: its module, its parameters and where they came from."""
  model: Any          # AutoencoderKL | VQModel
  params: Any
  path: str           # the run's workdir or the diffusers folder
  kind: str           # "kl" | "vq"
  config: dict        # the module's fields (`ldm_jax.models.vae.make` rebuilds it)
  step: int | None    # training step of the checkpoint (None: a diffusers folder)
  use_ema: bool = False  # the run's EMA weights rather than its raw ones

  @property
  def fingerprint(self) -> str:
    """`vae_fingerprint` of the weights and the architecture — the module's fields in
    one canonical form, whichever way it was loaded — without the execution-only dtype /
    attention backend (a run may change them on resume) and the latent factors (a
    cache records its own; cache.scale="auto" sets them)."""
    from ldm_jax.data.latents import vae_fingerprint
    skip = ("dtype", "attention", "scaling_factor", "shift_factor")
    config = {k: v for k, v in module_config(self.model).items() if k not in skip}
    return vae_fingerprint(self.params, config)

  def info(self) -> dict:
    """What a latent cache's manifest records about this autoencoder."""
    return {"path": self.path, "kind": self.kind, "config": self.config, "step": self.step,
            "use_ema": self.use_ema, "scaling_factor": float(self.model.scaling_factor),
            "shift_factor": float(self.model.shift_factor)}


def module_config(model) -> dict:
  """The fields of an autoencoder module as a JSON-able dict with its `kind`."""
  from ldm_jax.models import vae
  kind = "vq" if isinstance(model, vae.VQModel) else "kl"
  out = {"kind": kind}
  for field in dataclasses.fields(model):
    if field.name in ("parent", "name"):
      continue
    value = getattr(model, field.name)
    if field.name == "dtype":
      value = jnp.dtype(value).name
    out[field.name] = list(value) if isinstance(value, tuple) else value
  return out


def _is_diffusers_folder(path: str) -> bool:
  """A folder whose config.json is a diffusers model config (not an ldm_jax run's)."""
  import json
  try:
    with open(os.path.join(path, "config.json")) as f:
      config = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(config, dict) and ("_class_name" in config or "_diffusers_version" in config) \
      and not {"task", "model", "data"} & set(config)


def load_first_stage(path: str, use_ema: bool = False, step: int | None = None) -> FirstStage:
  """The autoencoder of an ldm_jax autoencode run's workdir (checkpoint `step`, default
  the latest; raw weights unless `use_ema`) or of a diffusers AutoencoderKL / VQModel
  folder. Only the autoencoder is built: no LPIPS files, discriminator shapes or mesh
  of the training run are needed (it is restored on one device).

  Raises:
    UserError: the path is missing, holds another kind of run or folder, or no checkpoint.
  """
  from ldm_jax import run_config
  check(bool(path), "no autoencoder given: name an autoencode run's workdir or a diffusers "
        "AutoencoderKL / VQModel folder")
  check(os.path.isdir(path), f"autoencoder {path!r} does not exist (expected an autoencode "
        f"run's workdir or a diffusers vae folder)")
  path = os.path.abspath(path)
  if _is_diffusers_folder(path):
    from ldm_jax.convert import vae as cvae
    from ldm_jax.models import vae
    params, config = cvae.from_diffusers(path)
    return FirstStage(vae.make(config), params, path, config["kind"], dict(config), None)
  saved = run_config.read_saved_config(path)
  from ldm_jax.training.checkpoint import Checkpointer
  checkpointer = Checkpointer(path, read_only=True)
  try:
    saved = saved or checkpointer.restore_config()
    check(saved is not None, f"{path!r} holds neither an ldm_jax run (config.json and "
          f"checkpoints) nor a diffusers autoencoder folder")
    check(saved.get("task") == "autoencode",
          f"{path!r} is a task={saved.get('task', 'denoise')!r} run, not an autoencoder "
          f"(train one with configs/vae_mnist.py, task 'autoencode')")
    steps = checkpointer.all_steps()
    check(bool(steps), f"autoencoder run {path!r} has no checkpoint yet")
    step = steps[-1] if step is None else step
    check(step in steps, f"autoencoder run {path!r} has no checkpoint of step {step} "
          f"(it has {sorted(steps)}); the latent cache was written with that step's weights")
    config = ml_collections.ConfigDict(saved)
    # Inference only: one device, a one-device mesh, any batch size.
    config.mesh.shape = tuple(1 for _ in config.mesh.axes)
    config.data.batch_size = 1
    from ldm_jax.training.setup import build_training
    setup = build_training(config, devices=jax.local_devices()[:1])
    with jax.set_mesh(setup.mesh):
      state = checkpointer.restore(setup.abstract_state, step=step)
  finally:
    checkpointer.close()
  params = (state.ema_params if use_ema else state.params)["autoencoder"]
  params = jax.device_get(params)
  model = setup.model.autoencoder
  return FirstStage(model, params, path, setup.model.kind, module_config(model), step,
                    use_ema)


# -- encoding a dataset into a latent cache ------------------------------------------------

CACHE_DEFAULTS = dict(store="", dtype="float32", split="train", batch_size=250,
                      shard_size=4096, use_ema=False, scale="model", vae="", source="",
                      image_size=0, num_examples=0)
# cache.num_examples: encode only the source's first N examples (0 = all of them; the
# built-in shapes are an endless generator with a nominal data.num_examples).
# cache.source: "" encodes config.data itself; "captions" encodes the image + .txt
# caption folder data.folder at cache.image_size pixels (a text-to-image config whose
# training data is the cache: data.source = "latents").
CACHE_SOURCES = ("", "captions")
SCALES = ("model", "auto")


def auto_scaled(stage: FirstStage, source, batch_size: int, seed: int = 0) -> FirstStage:
  """LDM's `scale_by_std`: the stage with scaling_factor = 1 / std of posterior samples
  (VQ: of the latents) of the first `batch_size` images of `source`, so the cached
  latents have about unit variance. Every process computes the same value (the same
  images, the same key)."""
  from ldm_jax.models import vae as vae_lib
  from ldm_jax.training.step import to_model_range
  images = np.stack([np.asarray(source[i]["image"]) for i in range(min(batch_size, len(source)))])
  model = stage.model
  out = jax.jit(lambda p, x: model.apply({"params": p}, to_model_range(x), method=model.encode))(
      stage.params, images)
  z = out if isinstance(model, vae_lib.VQModel) else out.sample(jax.random.key(seed))
  std = float(jnp.std(z - model.shift_factor))
  check(std > 0 and np.isfinite(std), f"cache.scale='auto': the latents' std is {std}; use "
        f"cache.scale='model'")
  logger.info("cache.scale='auto': scaling_factor 1/std = %.6g (the model's: %g)", 1.0 / std,
              model.scaling_factor)
  return dataclasses.replace(stage, model=model.clone(scaling_factor=1.0 / std))


def make_encode_fn(stage: FirstStage, store: str, batch_size: int, seed: int = 0):
  """uint8 images (b <= batch_size, H, W, C) -> dict of normalised latents for
  `write_cache`: {"mean", "std"} (KL, mean_std), {"mean"} (posterior mean / VQ
  pre-quantisation latents), or {"latent"} (one posterior sample). Batches are padded to
  `batch_size` (one compiled program) and split over this process's devices."""
  from ldm_jax.models import vae as vae_lib
  from ldm_jax.training.step import to_model_range
  model = stage.model
  devices = jax.local_devices()
  ways = max(d for d in range(1, len(devices) + 1) if batch_size % d == 0 and len(devices) % d == 0)
  mesh = jax.sharding.Mesh(np.asarray(devices[:ways]), ("data",))
  data_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  params = jax.device_put(stage.params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

  @jax.jit
  def encode(params, images, key):
    x = to_model_range(images)
    out = model.apply({"params": params}, x, method=model.encode)
    scale = model.scaling_factor
    if isinstance(model, vae_lib.VQModel):
      return {"mean": model.to_latent(out)}
    if store == "sample":
      return {"latent": model.to_latent(out.sample(key))}
    if store == "mean":
      return {"mean": model.to_latent(out.mean)}
    return {"mean": model.to_latent(out.mean), "std": out.std * scale}

  calls = [0]

  def encode_fn(images: np.ndarray) -> dict:
    n = len(images)
    padded = np.resize(images, (batch_size,) + images.shape[1:]) if n < batch_size else images
    key = jax.random.fold_in(jax.random.key(seed), calls[0] * jax.process_count()
                             + jax.process_index())
    calls[0] += 1
    out = encode(params, jax.device_put(padded, data_sharding), key)
    return {k: v[:n] for k, v in out.items()}

  return encode_fn


class _Head:
  """The first `n` examples of a random-access source."""

  def __init__(self, source, n: int):
    self.source, self.n = source, int(n)

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, index: int):
    check(0 <= int(index) < self.n, f"example {index} out of range [0, {self.n})")
    return self.source[index]


def cache_latents(config, workdir: str, cache_dir: str) -> dict:
  """`--mode=cache_latents`: encodes `config.data` (split `config.cache.split`) with the
  autoencoder of the run in `workdir` into a new latent cache `cache_dir`; returns its
  manifest. Options in `config.cache` (see CACHE_DEFAULTS): store (mean_std | mean |
  sample; default mean_std for KL, mean for VQ), dtype, split, batch_size, shard_size,
  use_ema, scale ("model": the autoencoder's scaling_factor; "auto": LDM's scale_by_std,
  1 / std of the first batch's latents, recorded in the manifest and used to decode),
  vae (the autoencoder's run or diffusers folder instead of `workdir`), source and
  image_size (CACHE_SOURCES), num_examples (the first N; 0 = all). With data.tokenizer
  = "sd3" every caption is also encoded by SD3's text stack (data.text_pipeline) into
  the cache's text embeddings."""
  from ldm_jax.data import latents
  from ldm_jax.data.pipeline import make_source
  check(bool(cache_dir), "--mode=cache_latents needs --cache_dir=DIR (a new directory)")
  options = dict(CACHE_DEFAULTS, **dict(config.get("cache", {})))
  unknown = sorted(set(options) - set(CACHE_DEFAULTS))
  check(not unknown, f"unknown config.cache keys {unknown}; valid: {sorted(CACHE_DEFAULTS)}")
  cache_dir = os.path.abspath(cache_dir)
  check(not os.path.exists(os.path.join(cache_dir, latents.MANIFEST)),
        f"--cache_dir {cache_dir!r} already holds a latent cache; nothing was overwritten "
        f"(choose a new directory)")
  check(options["scale"] in SCALES,
        f"config.cache.scale={options['scale']!r}; valid: {list(SCALES)}")
  check(options["source"] in CACHE_SOURCES,
        f"config.cache.source={options['source']!r}; valid: {list(CACHE_SOURCES)}")
  check(options["source"] or config.data.source != "latents",
        "--mode=cache_latents: data.source='latents' is what this mode writes; name the "
        "images to encode with config.cache.source='captions' (and data.folder)")
  from ldm_jax.data.text import is_sd3, sd3_encode, sd3_settings, sd3_stack
  if options["source"] == "captions" or is_sd3(config.data):
    needs = [(k, w) for k, w, ok in (
        ("data.folder", "a folder of images with a .txt caption next to each",
         bool(config.data.get("folder", "")) or options["source"] != "captions"),
        ("cache.vae", "the autoencoder (a diffusers AutoencoderKL folder or an ldm_jax run)",
         bool(options["vae"]) or options["source"] != "captions"),
        ("data.text_pipeline", "a diffusers SD3 pipeline folder with the three text "
         "encoders and tokenizers", bool(config.data.get("text_pipeline", ""))
         or not is_sd3(config.data))) if not ok]
    check(not needs, "--mode=cache_latents needs " + "; ".join(
        f"--config.{k}=DIR ({w})" for k, w in needs))
  stage = load_first_stage(options["vae"] or workdir, use_ema=bool(options["use_ema"]))
  if stage.step is not None and not options["vae"]:
    # an ldm_jax autoencode run given as --workdir: its saved config must be this one
    from ldm_jax import run_config
    run_config.check_compatible(run_config.read_saved_config(stage.path), config, stage.path)
  store = options["store"] or ("mean" if stage.kind == "vq" else "mean_std")
  check(not (stage.kind == "vq" and store != "mean"),
        f"config.cache.store={store!r}: a VQ autoencoder has deterministic latents; use 'mean'")
  if options["source"] == "captions":
    from ldm_jax.data.folders import CaptionFolderSource
    size = int(options["image_size"])
    check(size > 0, "config.cache.source='captions' needs config.cache.image_size (pixels)")
    source = CaptionFolderSource(config.data.folder, size, 3)
    latent_channels = stage.model.embed_dim if stage.kind == "vq" else stage.model.latent_channels
    check(latent_channels == config.data.channels,
          f"the autoencoder {stage.path!r} has {latent_channels}-channel latents but the "
          f"denoiser's data.channels={config.data.channels}; set data.channels="
          f"{latent_channels} or use another autoencoder")
  else:
    source = make_source(config.data, options["split"])
  limit = int(options["num_examples"])
  check(limit >= 0, f"config.cache.num_examples={limit} must be >= 0 (0 = the whole source)")
  if 0 < limit < len(source):
    source = _Head(source, limit)
  batch_size = int(options["batch_size"])
  text_fn = text_info = None
  if is_sd3(config.data):
    stack = sd3_stack(config.data)
    settings = sd3_settings(config.data)
    text_fn = lambda captions: sd3_encode(stack, config.data, captions)  # noqa: E731
    text_info = dict(settings, pipeline=os.path.abspath(config.data.text_pipeline),
                     fingerprint=stack.fingerprint(**settings))
  if options["scale"] == "auto":
    stage = auto_scaled(stage, source, batch_size, config.seed)
  batches = latents.source_batches(source, batch_size, process_index=jax.process_index(),
                                   process_count=jax.process_count())
  source_info = {"source": options["source"] or config.data.source, "split": options["split"],
                 "name": config.data.get("name", "") or config.data.get("folder", ""),
                 "image_size": int(options["image_size"]) or config.data.image_size,
                 "channels": 3 if options["source"] else config.data.channels,
                 "num_images": len(source)}
  logger.info("encoding %d images (%s, split %s) with the %s autoencoder of %s (step %s) "
              "into %s", len(source), config.data.source, options["split"], stage.kind,
              stage.path, stage.step, cache_dir)
  result = latents.write_cache(
      cache_dir, batches, make_encode_fn(stage, store, batch_size, config.seed), store=store,
      dtype=options["dtype"], vae_info=stage.info(), fingerprint=stage.fingerprint,
      source_info=source_info, num_classes=config.data.num_classes, text_fn=text_fn,
      text_info=text_info,
      shard_size=int(options["shard_size"]), process_index=jax.process_index(),
      process_count=jax.process_count())
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("ldm_jax latent cache shards written")
    if jax.process_index() == 0:
      result = latents.finalize_cache(cache_dir, process_count=jax.process_count())
    multihost_utils.sync_global_devices("ldm_jax latent cache manifest written")
    result = latents.read_manifest(cache_dir)
  logger.info("latent cache %s: %d latents of shape %s (%s, %s)", cache_dir,
              result["num_examples"], tuple(result["latent_shape"]), result["store"],
              result["dtype"])
  return result


# -- decoding a latent denoiser's samples ---------------------------------------------------

def cache_manifest(data_config) -> dict | None:
  """The latent cache manifest of a denoiser config (None for image data)."""
  if data_config.source != "latents":
    return None
  from ldm_jax.data.latents import read_manifest
  return read_manifest(data_config.get("latent_cache", ""))


def decoder_for(config) -> FirstStage | None:
  """For a denoiser trained on a latent cache: the autoencoder that decodes its
  samples (`data.vae` if set, else the one the cache's manifest names), checked to be
  the cache's (fingerprint) and to fit the denoiser (latent channels). None for
  denoisers on images."""
  manifest = cache_manifest(config.data)
  if manifest is None:
    return None
  given = config.data.get("vae", "")
  path = given or manifest["vae"].get("path", "")
  try:
    # The cache's own weights: the same checkpoint step and EMA choice (a run trained
    # further since is still usable); a `data.vae` given explicitly: its latest.
    stage = load_first_stage(path, use_ema=bool(manifest["vae"].get("use_ema", False)),
                             step=None if given else manifest["vae"].get("step"))
  except UserError as e:
    raise UserError(f"the latent cache {config.data.latent_cache!r} decodes with the "
                    f"autoencoder {path!r}, which cannot be loaded: {e} (set data.vae to "
                    f"its current location)") from e
  from ldm_jax.data.latents import check_cache
  check_cache(manifest, fingerprint=stage.fingerprint)
  # The factors the cache was written with (cache.scale="auto" sets its own).
  stage = dataclasses.replace(stage, model=stage.model.clone(
      scaling_factor=float(manifest["vae"]["scaling_factor"]),
      shift_factor=float(manifest["vae"]["shift_factor"])))
  channels = stage.model.embed_dim if stage.kind == "vq" else stage.model.latent_channels
  check(channels == config.data.channels,
        f"the autoencoder {path!r} has {channels}-channel latents but the denoiser's "
        f"data.channels={config.data.channels}; set data.channels={channels}")
  return stage


def decode_latents(stage_model, params, z: jax.Array) -> jax.Array:
  """Denoiser latents (normalised) -> images in [-1, 1] (jittable)."""
  images = stage_model.apply({"params": params}, stage_model.from_latent(z),
                             method=stage_model.decode)
  return jnp.clip(images, -1.0, 1.0)


def source_is_mnist(data_config) -> bool:
  """True for the built-in MNIST, also when reached through a latent cache of it."""
  if data_config.source == "mnist":
    return True
  manifest = cache_manifest(data_config)
  return manifest is not None and manifest["source"].get("source") == "mnist"


# -- export ---------------------------------------------------------------------------------

EXPORT_FORMATS = ("diffusers", "ldm")


def export_first_stage(path: str, out: str, fmt: str = "diffusers", use_ema: bool = False) -> str:
  """Writes the autoencoder of an autoencode run (or diffusers folder) `path` as a
  diffusers AutoencoderKL / VQModel folder (`fmt="diffusers"`, `out` a new directory)
  or an original-LDM-layout `.safetensors` file (`fmt="ldm"`). Never overwrites."""
  from ldm_jax.convert import vae as cvae
  check(fmt in EXPORT_FORMATS, f"unknown export format {fmt!r}; valid: {list(EXPORT_FORMATS)}")
  check(not os.path.exists(out), f"{out!r} exists; nothing was overwritten (choose a new path)")
  stage = load_first_stage(path, use_ema=use_ema)
  config = {k: v for k, v in stage.config.items() if k not in ("dtype", "attention")}
  if fmt == "ldm":
    return cvae.to_ldm_checkpoint(stage.params, config, out)
  cvae.to_diffusers(stage.params, config, out)
  return out
