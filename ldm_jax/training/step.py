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

from ldm_jax.errors import check
from ldm_jax.models.registry import model_labels
from ldm_jax.training.ema import ema_decay, ema_update
from ldm_jax.training.train_state import TrainState

TASKS = ("denoise", "classify")


def to_model_range(images_uint8):
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return images_uint8.astype(jnp.float32) / 127.5 - 1.0


def classifier_loss(logits, labels):
  """Per-example cross-entropy (B,) and the metrics {loss, accuracy}."""
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  accuracy = (jnp.argmax(logits, -1) == labels).astype(jnp.float32).mean()
  return per_example, {"loss": per_example.mean(), "accuracy": accuracy}


def noisy_inputs(process, x0, rng):
  """(x_t, model_time) at times and noise drawn as the process's training loss draws them."""
  t_rng, n_rng = jax.random.split(rng)
  t = process.sample_time(t_rng, x0.shape[0])
  noise = jax.random.normal(n_rng, x0.shape, x0.dtype)
  return process.add_noise(x0, noise, t), process.model_time(t)


def make_train_step(model, process, tx, ema: float, ema_warmup: bool, lr_schedule=None,
                    task: str = "denoise"):
  """Builds `train_step(state, batch) -> (state, metrics)`.

  Args:
    model: a Flax module called as model.apply({'params'}, x, model_time, labels, train).
    process: the diffusion process (its `loss`, or for "classify" its noising).
    tx: the optax optimizer.
    ema: EMA decay.
    ema_warmup: ramp the EMA decay in early steps.
    lr_schedule: optional step -> learning rate, reported in the metrics.
    task: "denoise" or "classify" (see the module docstring).
  """
  check(task in TASKS, f"unknown task {task!r}; valid: {list(TASKS)}")

  def train_step(state: TrainState, batch):
    step_rng = jax.random.fold_in(state.rng, state.step)
    loss_rng, dropout_rng = jax.random.split(step_rng)
    x0 = to_model_range(batch["image"])
    labels = batch["label"]

    def loss_fn(params):
      if task == "classify":
        x_t, model_time = noisy_inputs(process, x0, loss_rng)
        logits = model.apply({"params": params}, x_t, model_time, train=True)
        per_example, metrics = classifier_loss(logits, labels)
        return per_example.mean(), metrics

      def model_fn(x_t, model_time):
        return model.apply({"params": params}, x_t, model_time, model_labels(model, labels),
                           train=True, rngs={"label_dropout": dropout_rng})
      per_example, metrics = process.loss(model_fn, x0, loss_rng)
      return per_example.mean(), metrics

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(state.step, ema, ema_warmup)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads))
    if lr_schedule is not None:
      metrics["learning_rate"] = lr_schedule(state.step)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema_update(state.ema_params, params, decay))
    return new_state, metrics

  return train_step
