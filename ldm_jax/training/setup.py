"""Everything one training step needs, built from a config: model, process,
optimizer, mesh, logical rules, shardings, the abstract state and the step function.

Shared by training (`train.py`) and ahead-of-time compilation (`aot.py`), so the
step compiled for a TPU topology is the step that trains.
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import run_config
from ldm_jax.data.text import condition_struct, is_sd3, is_text, null_condition
from ldm_jax.diffusion import build_process
from ldm_jax.errors import check
from ldm_jax.models import build_model
from ldm_jax.training import sharding
from ldm_jax.training.optimizer import learning_rate_schedule, make_optimizer
from ldm_jax.training.step import make_train_step
from ldm_jax.training.train_state import create_state


@dataclasses.dataclass(frozen=True)
class TrainingSetup:
  """The pieces of a training run that do not touch files or data."""
  config: Any
  task: str
  model: Any
  process: Any
  tx: Any
  mesh: jax.sharding.Mesh
  rules: tuple
  batch_sharding: jax.sharding.NamedSharding
  state_shardings: Any
  abstract_state: Any       # ShapeDtypeStructs carrying their shardings
  step_fn: Callable         # (state, batch, frozen) -> (state, metrics), traced under the rules
  init_args: tuple = None   # dummy inputs of model.init (None: a denoiser's)
  abstract_data: bool = False  # shapes from the config alone (no latent cache read)

  def jit_step(self):
    """The step jitted with the state's and batch's shardings, the state donated;
    called as step(state, batch, frozen) with `frozen` from `load_frozen()`."""
    replicated = sharding.replicated(self.mesh)
    return jax.jit(self.step_fn,
                   in_shardings=(self.state_shardings, self.batch_sharding, replicated),
                   out_shardings=(self.state_shardings, None), donate_argnums=0)

  def init_state(self):
    """The initial state, born sharded (jitted init with out_shardings)."""
    with jax.set_mesh(self.mesh):
      state, _ = create_state(self.model, self.tx, self.config.data, self.config.seed,
                              self.mesh, self.rules, inputs=self.init_args)
    return state

  def load_frozen(self):
    """Frozen inputs the step reads, replicated on the mesh: the autoencode task's
    LDM-LPIPS; a text-to-image run's null (empty-prompt) condition; else {}."""
    if is_text(self.config.data) and self.task == "denoise":
      return jax.device_put({"null_condition": null_condition(self.config.data)},
                            sharding.replicated(self.mesh))
    if self.task != "autoencode":
      return {}
    from ldm_jax.training.autoencoder import load_frozen
    return jax.device_put(load_frozen(self.config.loss), sharding.replicated(self.mesh))

  def batch_struct(self) -> dict:
    """ShapeDtypeStructs of one global batch: uint8 images and int32 labels, or for a
    latent cache float32 latents (and their posterior std when the cache stores it)."""
    data = self.config.data
    size = (data.batch_size, data.image_size, data.image_size, data.channels)
    struct = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype,  # noqa: E731
                                                       sharding=self.batch_sharding)
    batch = {"label": struct(size[:1], jnp.int32)}
    if is_text(data):
      batch = {k: struct(shape, dtype) for k, (shape, dtype)
               in condition_struct(data, data.batch_size).items()}
    if data.source != "latents":
      return dict(batch, image=struct(size, jnp.uint8))
    from ldm_jax.data.latents import read_manifest
    batch["latent"] = struct(size, jnp.float32)
    if self.abstract_data and not data.get("latent_cache", ""):
      cache = (self.config.get("first_stage", None) or self.config).get("cache", {})
      store = cache.get("store", "") or "mean_std"  # the chain's own cache, if it has one
    else:
      store = read_manifest(data.get("latent_cache", ""))["store"]
    if store == "mean_std":
      batch["latent_std"] = struct(size, jnp.float32)
    return batch

  def frozen_abstract(self):
    """ShapeDtypeStructs of `load_frozen()`'s result (replicated), for lowering."""
    if self.task != "autoencode":
      replicated = sharding.replicated(self.mesh)
      if not (is_text(self.config.data) and self.task == "denoise"):
        return {}
      # One example of the condition (no batch axis): int32 tokens or float32 parts,
      # as `null_condition` returns them (no encoder is loaded for this).
      return {"null_condition": {
          k: jax.ShapeDtypeStruct(shape[1:], np.int32 if k == "tokens" else np.float32,
                                  sharding=replicated)
          for k, (shape, _) in condition_struct(self.config.data, 1).items()}}
    from ldm_jax.training.autoencoder import frozen_struct
    replicated = sharding.replicated(self.mesh)
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
        frozen_struct(self.config.loss))


def build_training(config, devices=None, abstract_data: bool = False) -> TrainingSetup:
  """A `TrainingSetup` for `config` on `devices` (default: all of this run's devices;
  a TPU topology's devices for ahead-of-time compilation). Every check that can fail
  on the config runs here, before anything is written. `abstract_data`: batch shapes
  from the config alone, so a latent cache need not exist yet (ahead of time)."""
  run_config.validate(config, need_data=not abstract_data)
  task = run_config.task_of(config)
  init_args = None
  if task == "autoencode":
    from ldm_jax.training import autoencoder
    model = autoencoder.build_autoencoder_gan(config)
    process = None
    tx = autoencoder.make_autoencoder_optimizer(config, autoencoder.uses_ema_codebook(model))
    data = config.data
    init_args = (jnp.zeros((1, data.image_size, data.image_size, data.channels), jnp.float32),)
  else:
    model = build_model(config.model, input_size=config.data.image_size,
                        in_channels=config.data.channels, num_classes=config.data.num_classes)
    process = build_process(config.diffusion, config.data.image_size)
    tx = make_optimizer(config.optim, config.num_train_steps)
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.logical_rules(config.mesh, mesh)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  sharding.check_batch_divisible(config.data.batch_size, batch_sharding)
  # Abstract only, outside `jax.set_mesh`: the mesh may hold a TPU topology's devices
  # (ahead-of-time compilation), on which nothing can be placed.
  abstract_state, state_shardings = create_state(model, tx, config.data, config.seed, mesh,
                                                 rules, materialize=False, inputs=init_args)
  sharding.check_replication(abstract_state.params, state_shardings.params, mesh,
                             int(config.mesh.get("max_replicated_size", 1 << 20)))
  accum = int(config.optim.get("grad_accum_steps", 1))
  check(accum >= 1, f"optim.grad_accum_steps must be >= 1, got {accum}")
  ways = sharding.data_parallel_ways(batch_sharding)
  check(config.data.batch_size % (accum * ways) == 0,
        f"data.batch_size={config.data.batch_size} must be a multiple of optim.grad_accum_steps "
        f"({accum}) x the {ways} data-parallel devices = {accum * ways}, so that every "
        f"micro-batch splits evenly over the devices")
  schedule = learning_rate_schedule(config.optim, config.num_train_steps)
  nan_policy = config.optim.get("nan_policy", "stop")
  if task == "autoencode":
    check(accum == 1, f"optim.grad_accum_steps={accum}: gradient accumulation is not "
          f"available for task 'autoencode' (the GAN's adaptive weight is per batch); use 1")
    raw_step = autoencoder.make_autoencoder_step(
        model, tx, autoencoder.LossConfig.from_config(config.loss), config.optim.ema_decay,
        config.optim.ema_warmup, schedule, nan_policy=nan_policy)
  else:
    text_dropout = float(config.model.get("text_dropout", 0.0)) if is_text(config.data) else 0.0
    check(0.0 <= text_dropout < 1.0,
          f"model.text_dropout={text_dropout} must lie in [0, 1)")
    encoder_dropout = (float(config.model.get("text_encoder_dropout", 0.0))
                       if is_sd3(config.data) else 0.0)
    check(0.0 <= encoder_dropout < 1.0,
          f"model.text_encoder_dropout={encoder_dropout} must lie in [0, 1)")

    denoise_step = make_train_step(model, process, tx, config.optim.ema_decay,
                                   config.optim.ema_warmup, schedule, task=task,
                                   grad_accum_steps=accum, nan_policy=nan_policy,
                                   text_dropout=text_dropout,
                                   encoder_dropout=encoder_dropout)
    raw_step = denoise_step

  def step_fn(state, batch, frozen):
    with nn.logical_axis_rules(rules):  # activation constraints resolve while tracing
      return raw_step(state, batch, frozen)

  return TrainingSetup(config=config, task=task, model=model, process=process, tx=tx,
                       mesh=mesh, rules=rules, batch_sharding=batch_sharding,
                       state_shardings=state_shardings, abstract_state=abstract_state,
                       step_fn=step_fn, init_args=init_args, abstract_data=abstract_data)
