"""The built-in MNIST judge: its Fréchet distance against the closed form, and its
accuracy / distance on real held-out digits versus noise."""

import numpy as np
import scipy.linalg

from ldm_jax.data.builtin import load_mnist
from ldm_jax.evaluation import mnist_judge


def test_frechet_distance_matches_closed_form():
  rng = np.random.default_rng(0)
  dim, n = 4, 200_000
  mu_a, mu_b = np.zeros(dim), np.array([1.0, -0.5, 0.0, 2.0])
  cov_a = np.diag([1.0, 2.0, 0.5, 1.0])
  root = rng.standard_normal((dim, dim)) * 0.3
  cov_b = root @ root.T + np.eye(dim) * 0.5
  a = rng.multivariate_normal(mu_a, cov_a, n)
  b = rng.multivariate_normal(mu_b, cov_b, n)
  exact = (np.sum((mu_a - mu_b) ** 2)
           + np.trace(cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real))
  assert abs(mnist_judge.frechet_distance(a, b) - exact) < 0.02 * exact
  assert mnist_judge.frechet_distance(a[: n // 2], a[n // 2:]) < 1e-3


def test_judge_scores_real_digits_high_and_noise_low(tmp_path):
  held_x, held_y = load_mnist("heldout")
  report = mnist_judge.judge_samples(held_x, held_y, out_dir=str(tmp_path))
  assert report["judge_heldout_accuracy"] >= 0.97
  assert report["accuracy"] >= 0.97 and report["fd"] < 50
  assert (tmp_path / "judge.json").exists()
  noise = np.random.default_rng(0).integers(0, 256, held_x.shape).astype(np.uint8)
  noisy = mnist_judge.judge_samples(noise, held_y)
  assert noisy["accuracy"] < 0.3
  assert noisy["fd"] > 20 * report["fd"]
  # Wrong labels on real digits: accuracy collapses, distance does not move.
  shifted = mnist_judge.judge_samples(held_x, (held_y + 1) % 10)
  assert shifted["accuracy"] < 0.05 and shifted["fd"] == report["fd"]
