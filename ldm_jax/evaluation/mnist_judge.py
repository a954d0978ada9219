"""The built-in MNIST judge: a small CNN classifier trained on the MNIST-5k training
split (4,500 digits), used for (a) class accuracy of generated digits and (b) a
Fréchet distance between classifier features (penultimate layer, 128-d, before
its ReLU) of the
samples and of the real training digits, next to the same distance for the
held-out real digits (the floor a perfect generator would reach at that size).

The classifier trains in about 70 s on a 2-core CPU, deterministically from
its seed, and is cached under ~/.cache/ldm_jax/.

  python -m ldm_jax.evaluation.mnist_judge --samples=runs/quickstart/samples/<dir>/samples.npz
"""

import json
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.linalg

from ldm_jax.convert.common import flatten_params, unflatten
from ldm_jax.data.builtin import load_mnist
from ldm_jax.errors import check

logger = logging.getLogger("ldm_jax")
JUDGE_VERSION = 3
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "ldm_jax")


class Classifier(nn.Module):
  """conv32 -> pool -> conv64 -> pool -> dense128 -> 10 (trains in ~1 min on 2 cores)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    for features in (32, 64):
      x = nn.relu(nn.Conv(features, (3, 3))(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.Dropout(0.3, deterministic=not train)(x)
    features = nn.Dense(128)(x)  # pre-activation: no dead (constant) dimensions for the FD
    return nn.Dense(10)(nn.relu(features)), features


def _prep(images_uint8):
  return jnp.asarray(images_uint8, jnp.float32) / 127.5 - 1.0


def _random_shift(key, images, max_shift=2):
  """Augmentation: shift each image by up to `max_shift` pixels (zero padding)."""
  padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)),
                   constant_values=-1.0)
  shifts = jax.random.randint(key, (images.shape[0], 2), 0, 2 * max_shift + 1)
  crop = lambda img, s: jax.lax.dynamic_slice(img, (s[0], s[1], 0), images.shape[1:])
  return jax.vmap(crop)(padded, shifts)


def train_classifier(seed: int = 0, epochs: int = 16, batch_size: int = 128):
  """Trains the judge on the training split; returns (params, heldout accuracy)."""
  images, labels = load_mnist("train")
  model = Classifier()
  key = jax.random.key(seed)
  params = model.init(key, jnp.zeros((1, 28, 28, 1)))["params"]
  steps = epochs * (len(images) // batch_size)
  tx = optax.adamw(optax.cosine_decay_schedule(2e-3, steps), weight_decay=1e-4)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y, key):
    aug_key, drop_key = jax.random.split(key)
    x = _random_shift(aug_key, _prep(x))

    def loss_fn(p):
      logits, _ = model.apply({"params": p}, x, train=True, rngs={"dropout": drop_key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(seed)
  for epoch in range(epochs):
    order = rng.permutation(len(images))
    for b in range(len(images) // batch_size):
      idx = order[b * batch_size:(b + 1) * batch_size]
      key, sub = jax.random.split(key)
      params, opt_state = step(params, opt_state, images[idx], labels[idx], sub)
  held_images, held_labels = load_mnist("heldout")
  logits, _ = classify(params, held_images)
  accuracy = float((logits.argmax(-1) == held_labels).mean())
  return params, accuracy


@jax.jit
def _forward(params, x):
  return Classifier().apply({"params": params}, _prep(x))


def classify(params, images: np.ndarray, batch_size: int = 500):
  """(logits (N, 10), features (N, 128)) as numpy, in batches."""
  logits, feats = [], []
  for i in range(0, len(images), batch_size):
    chunk = images[i:i + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    out_logits, out_feats = _forward(params, chunk)
    logits.append(np.asarray(out_logits)[:batch_size - pad])
    feats.append(np.asarray(out_feats)[:batch_size - pad])
  return np.concatenate(logits), np.concatenate(feats).astype(np.float64)


def load_or_train(seed: int = 0):
  """The cached judge (params, heldout accuracy), training it on first use."""
  path = os.path.join(CACHE_DIR, f"mnist_judge_v{JUDGE_VERSION}_seed{seed}.npz")
  if os.path.exists(path):
    with np.load(path) as data:
      flat = {k: data[k] for k in data.files if k != "__accuracy__"}
      accuracy = float(data["__accuracy__"])
    params = jax.tree_util.tree_map(jnp.asarray, unflatten(flat))
    return params, accuracy
  logger.info("training the MNIST judge classifier (cached afterwards in %s)", path)
  params, accuracy = train_classifier(seed)
  os.makedirs(CACHE_DIR, exist_ok=True)
  flat = flatten_params(params)
  np.savez(path + ".tmp.npz", __accuracy__=np.float64(accuracy), **flat)
  os.replace(path + ".tmp.npz", path)
  return params, accuracy


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
  """||μa-μb||² + Tr(Σa + Σb - 2(ΣaΣb)^½) between Gaussian fits (FID's formula)."""
  mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
  cov_a, cov_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
  covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
  return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def judge_samples(images: np.ndarray, labels: np.ndarray, out_dir: str | None = None,
                  seed: int = 0) -> dict:
  """Scores uint8 (N, 28, 28, 1) samples against their intended labels.

  Returns a dict: accuracy, per-class accuracy, fd (samples vs real training
  digits), fd_first_500 (the first 500 samples: balanced labels, the held-out size),
  fd_real_heldout (the 500 held-out real digits vs training digits: the floor),
  and the judge's own accuracy on held-out real digits. Writes judge.json into
  `out_dir` when given.
  """
  check(images.ndim == 4 and images.shape[1:] == (28, 28, 1),
        f"the MNIST judge needs (N, 28, 28, 1) uint8 images, got {images.shape}")
  params, judge_accuracy = load_or_train(seed)
  logits, feats = classify(params, images)
  predicted = logits.argmax(-1)
  train_images, _ = load_mnist("train")
  held_images, _ = load_mnist("heldout")
  _, train_feats = classify(params, train_images)
  _, held_feats = classify(params, held_images)
  report = {
      "num_samples": int(len(images)),
      "accuracy": float((predicted == labels).mean()),
      "per_class_accuracy": [float((predicted[labels == c] == c).mean()) if (labels == c).any()
                             else None for c in range(10)],
      "fd": frechet_distance(feats, train_feats),
      # The same size as the held-out set (the estimate's bias depends on N).
      "fd_first_500": frechet_distance(feats[:len(held_feats)], train_feats),
      "fd_real_heldout": frechet_distance(held_feats, train_feats),
      "judge_heldout_accuracy": judge_accuracy,
  }
  if out_dir:
    with open(os.path.join(out_dir, "judge.json"), "w") as f:
      json.dump(report, f, indent=2)
  return report


def main(argv):
  del argv
  from absl import flags
  path = flags.FLAGS.samples
  check(os.path.isfile(path), f"--samples {path!r} is not a file (expected samples.npz)")
  with np.load(path) as data:
    images, labels = data["arr_0"], data["arr_1"]
  print(json.dumps(judge_samples(images, labels), indent=2))


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("samples", None, "samples.npz (arr_0 uint8 NHWC, arr_1 labels)")
  app.run(main)
