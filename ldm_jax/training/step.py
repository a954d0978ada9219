"""The pure training step: (state, batch) -> (state, metrics), jitted once with the
state donated. It knows nothing of files, devices or configs beyond what it is given.

Two tasks share it (`config.task`):
  denoise   the process's own loss on the denoiser (the default);
  classify  a time-conditional classifier of noisy images (classifier guidance,
            Dhariwal & Nichol 2021): t and ε drawn as the process draws them for its
            loss, x_t = process.add_noise(x0, ε, t), cross-entropy of
            classifier(x_t, process.model_time(t)) against the label.
"""

import jax
import jax.numpy as jnp
import optax

from ldm_jax.diffusion.process import training_draws
from ldm_jax.errors import check
from ldm_jax.models.registry import model_labels
from ldm_jax.pipelines.sd3_text import PART_KEYS, drop_encoders
from ldm_jax.training.ema import ema_decay, ema_update
from ldm_jax.training.train_state import TrainState

TASKS = ("denoise", "classify")
NAN_POLICIES = ("stop", "skip")


def to_model_range(images_uint8):
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return images_uint8.astype(jnp.float32) / 127.5 - 1.0


def batch_inputs(batch, key):
  """The clean model inputs x0 of a batch: images scaled to [-1, 1], or latents from a
  latent cache (ldm_jax/data/latents.py) — with a stored posterior std, a fresh
  z = mean + std * eps every step (LDM trains on posterior samples)."""
  if "latent" not in batch:
    return to_model_range(batch["image"])
  latent = batch["latent"].astype(jnp.float32)
  if "latent_std" in batch:
    noise = jax.random.normal(jax.random.fold_in(key, 7), latent.shape, jnp.float32)
    latent = latent + batch["latent_std"].astype(jnp.float32) * noise
  return latent


# Batch entries that condition a text-to-image denoiser: token ids (a model with its
# own text encoder) or precomputed text embeddings: assembled (context, pooled) or, from
# an SD3 text-embedding cache, each encoder's parts (ldm_jax/pipelines/sd3_text.py).
TEXT_KEYS = ("tokens", "context", "pooled") + PART_KEYS


def batch_condition(batch):
  """The denoiser's condition in a batch: its class labels (B,), or for a
  text-to-image model a dict of its text entries (TEXT_KEYS)."""
  text = {k: batch[k] for k in TEXT_KEYS if k in batch}
  return text if text else batch["label"]


def drop_condition(cond, null, prob: float, key):
  """Condition dropout for classifier-free guidance on a text condition: each example's
  condition is replaced by the null (empty-prompt) one with probability `prob`.

  Args:
    cond: dict of (B, ...) arrays (TEXT_KEYS).
    null: dict of one example's arrays (the same keys).
    prob: dropout probability.
    key: PRNG key.
  """
  drop = jax.random.bernoulli(key, prob, (jax.tree_util.tree_leaves(cond)[0].shape[0],))

  def swap(c, n):
    where = drop.reshape((-1,) + (1,) * (c.ndim - 1))
    return jnp.where(where, jnp.broadcast_to(n.astype(c.dtype), c.shape), c)

  return {k: swap(v, null[k]) for k, v in cond.items()}


def classifier_loss(logits, labels):
  """Per-example cross-entropy (B,) and the metrics {loss, accuracy}."""
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  accuracy = (jnp.argmax(logits, -1) == labels).astype(jnp.float32).mean()
  return per_example, {"loss": per_example.mean(), "accuracy": accuracy}


def make_train_step(model, process, tx, ema: float, ema_warmup: bool, lr_schedule=None,
                    task: str = "denoise", grad_accum_steps: int = 1, nan_policy: str = "stop",
                    text_dropout: float = 0.0, encoder_dropout: float = 0.0):
  """Builds `train_step(state, batch, frozen=None) -> (state, metrics)`.

  Args:
    model: a Flax module called as model.apply({'params'}, x, model_time, labels, train).
    process: the diffusion process (its `loss`, or for "classify" its noising).
    tx: the optax optimizer.
    ema: EMA decay.
    ema_warmup: ramp the EMA decay in early steps.
    lr_schedule: optional step -> learning rate, reported in the metrics.
    task: "denoise" or "classify" (see the module docstring).
    grad_accum_steps: k > 1 runs the global batch as k micro-batches in a lax.scan and
      applies one update with their mean gradient. The (t, ε) draws are made once for
      the whole batch, so with no label dropout the update equals k = 1's.
    nan_policy: "stop" (the host stops the run; see train.py) or "skip": a step with a
      non-finite loss or gradient applies no update (metric `skipped` = 1).
    text_dropout: probability of replacing a text condition by the null one
      (`frozen["null_condition"]`, the empty prompt's), for classifier-free guidance.
    encoder_dropout: for a condition of SD3 encoder parts, the probability of dropping
      each encoder on its own to the null condition's parts (`sd3_text.drop_encoders`;
      the SD3 paper's 46.4 %).
  """
  check(task in TASKS, f"unknown task {task!r}; valid: {list(TASKS)}")
  check(nan_policy in NAN_POLICIES,
        f"unknown optim.nan_policy {nan_policy!r}; valid: {list(NAN_POLICIES)}")
  check(grad_accum_steps >= 1, f"optim.grad_accum_steps must be >= 1, got {grad_accum_steps}")

  def loss_fn(params, x0, labels, draws, dropout_rng):
    """Mean loss of one (micro-)batch and its metrics, given the (t, ε) draws."""
    t, noise = draws
    if task == "classify":
      x_t = process.add_noise(x0, noise, t)
      logits = model.apply({"params": params}, x_t, process.model_time(t), train=True)
      per_example, metrics = classifier_loss(logits, labels)
      return per_example.mean(), metrics

    def model_fn(x_t, model_time):
      return model.apply({"params": params}, x_t, model_time, model_labels(model, labels),
                         train=True, rngs={"label_dropout": dropout_rng})
    per_example, metrics = process.loss(model_fn, x0, None, draws=draws)
    return per_example.mean(), metrics

  grad_fn = jax.grad(loss_fn, has_aux=True)

  def gradients(params, x0, labels, draws, dropout_rng):
    if grad_accum_steps == 1:
      return grad_fn(params, x0, labels, draws, dropout_rng)
    k = grad_accum_steps
    # Micro-batch i takes rows i, i+k, i+2k, ...: each device's contiguous shard of the
    # batch feeds every micro-batch, so no rows move between devices.
    micro = jax.tree_util.tree_map(
        lambda a: a.reshape(a.shape[0] // k, k, *a.shape[1:]).swapaxes(0, 1),
        (x0, labels, draws))

    def accumulate(total, inputs):
      i, (x0_i, labels_i, draws_i) = inputs
      grads, metrics = grad_fn(params, x0_i, labels_i, draws_i,
                               jax.random.fold_in(dropout_rng, i))
      return jax.tree_util.tree_map(jnp.add, total, (grads, metrics)), None

    zeros = jax.tree_util.tree_map(
        jnp.zeros_like, jax.eval_shape(grad_fn, params, *jax.tree_util.tree_map(
            lambda a: a[0], micro), dropout_rng))
    total, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(k), micro))
    return jax.tree_util.tree_map(lambda a: a / k, total)

  def train_step(state: TrainState, batch, frozen=None):
    step_rng = jax.random.fold_in(state.rng, state.step)
    loss_rng, dropout_rng = jax.random.split(step_rng)
    x0 = batch_inputs(batch, step_rng)
    draws = training_draws(process, loss_rng, x0)
    cond = batch_condition(batch)
    if encoder_dropout > 0 and isinstance(cond, dict) and "t5" in cond:
      cond = drop_encoders(cond, frozen["null_condition"], encoder_dropout,
                           jax.random.fold_in(dropout_rng, 13))
    if text_dropout > 0 and isinstance(cond, dict):
      cond = drop_condition(cond, frozen["null_condition"], text_dropout,
                            jax.random.fold_in(dropout_rng, 11))
    grads, metrics = gradients(state.params, x0, cond, draws, dropout_rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(state.step, ema, ema_warmup)
    ema_params = ema_update(state.ema_params, params, decay)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads))
    if nan_policy == "skip":
      finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
      keep = lambda new, old: jax.tree_util.tree_map(  # noqa: E731
          lambda a, b: jnp.where(finite, a, b), new, old)
      params, opt_state, ema_params = keep((params, opt_state, ema_params),
                                           (state.params, state.opt_state, state.ema_params))
      metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
    if lr_schedule is not None:
      metrics["learning_rate"] = lr_schedule(state.step)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema_params)
    return new_state, metrics

  return train_step
