"""Classifier guidance (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", §4):
a classifier p_φ(y | x_t, t) trained on noisy images steers a Gaussian sampler by
g = s·∇_x log p_φ(y | x_t). The samplers apply g (`samplers.py`, `cond_fn`): DDPM
shifts the posterior mean by Σ_t·g (ADM's Algorithm 1), DDIM replaces ε̂ by
ε̂ - sqrt(1-ᾱ_t)·g (Algorithm 2).
"""

import jax
import jax.numpy as jnp

from ldm_jax.errors import check

# Samplers that take a cond_fn (classifier guidance is defined here for these).
GUIDED_SAMPLERS = ("ddpm", "ddim")


def make_cond_fn(classifier_apply, labels, scale: float):
  """`cond_fn(x_t, model_time) -> scale·∇_x log softmax(classifier(x_t, t))[y]`.

  Args:
    classifier_apply: `(x_t, model_time) -> logits (B, num_classes)`.
    labels: (B,) int target classes y.
    scale: the guidance scale s.
  The per-example log-probabilities are summed before differentiating: examples do
  not interact in the classifier, so each example's gradient is its own.
  """

  def total_log_prob(x, model_time):
    log_probs = jax.nn.log_softmax(classifier_apply(x, model_time).astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1).sum()

  def cond_fn(x_t, model_time):
    model_time = jnp.broadcast_to(model_time, (x_t.shape[0],))
    return scale * jax.grad(total_log_prob)(x_t, model_time)

  return cond_fn


def check_guided_sampler(process_kind: str, sampler: str) -> None:
  """Classifier guidance needs a Gaussian process and a DDPM / DDIM sampler."""
  check(process_kind == "gaussian",
        f"classifier guidance (sample.classifier_workdir) needs diffusion.process="
        f"'gaussian'; got {process_kind!r} (it is defined here for DDPM / DDIM sampling)")
  check(sampler in GUIDED_SAMPLERS,
        f"classifier guidance (sample.classifier_workdir) needs sample.sampler in "
        f"{list(GUIDED_SAMPLERS)}; got {sampler!r}")
