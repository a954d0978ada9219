"""Full-reference image quality: PSNR and SSIM per example, jnp and jittable.

Images are NHWC floats; `data_range` is the span of possible values (1.0 for [0, 1]
images, 2.0 for [-1, 1], 255.0 for 8-bit values held as floats).

`ssim` is Wang et al. 2004's SSIM as scikit-image computes it with
`structural_similarity(x, y, data_range=..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, channel_axis=-1)`: local means and population
(co)variances under an 11x11 Gaussian window (sigma 1.5, truncated at 3.5 sigma and
normalised), K1 = 0.01, K2 = 0.03, the SSIM map averaged over the positions where the
whole window lies inside the image (scikit-image filters with reflected borders, then
crops 5 pixels off each side, which leaves exactly those), per channel, then averaged
over channels. Computed in float32 on data divided by `data_range` (SSIM is unchanged
by scaling images and range together), with variances taken around each image's
mean to keep float32 cancellation small; tests/test_image_metrics.py holds it within
1e-5 of scikit-image's float64 result.
"""

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.errors import check

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # scipy.ndimage / scikit-image's Gaussian truncation, in sigmas
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_RADIUS = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)  # 5: an 11x11 window
SSIM_WINDOW = 2 * SSIM_RADIUS + 1


def _check_pair(x: jax.Array, y: jax.Array, what: str) -> None:
  check(x.shape == y.shape, f"{what} needs two images of one shape, got {x.shape} and "
        f"{y.shape}")
  check(x.ndim == 4, f"{what} takes NHWC batches, got shape {x.shape}")


def psnr(x: jax.Array, y: jax.Array, data_range: float) -> jax.Array:
  """Peak signal-to-noise ratio per example, in dB: 10 log10(range^2 / MSE).

  Args:
    x, y: NHWC float images of one shape.
    data_range: span of possible pixel values.
  Returns:
    (B,) float32. Identical images give +inf (MSE 0); average with care.
  """
  _check_pair(x, y, "psnr")
  diff = x.astype(jnp.float32) - y.astype(jnp.float32)
  mse = jnp.mean(diff * diff, axis=(1, 2, 3))
  return 10.0 * jnp.log10(jnp.float32(data_range) ** 2 / mse)


def gaussian_window() -> np.ndarray:
  """SSIM's normalised 1-D Gaussian window (length 11, sigma 1.5), float64."""
  t = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=np.float64)
  w = np.exp(-0.5 * (t / SSIM_SIGMA) ** 2)
  return w / w.sum()


def _filter_valid(a: jax.Array, w: jax.Array) -> jax.Array:
  """Separable 'valid' Gaussian filtering of NHWC `a` over H and W."""
  n = w.shape[0]
  h, wd = a.shape[1] - n + 1, a.shape[2] - n + 1
  a = sum(w[k] * a[:, k:k + h] for k in range(n))
  return sum(w[k] * a[:, :, k:k + wd] for k in range(n))


def ssim(x: jax.Array, y: jax.Array, data_range: float) -> jax.Array:
  """Structural similarity per example (see module doc for the exact definition).

  Args:
    x, y: NHWC float images of one shape, height and width at least 11.
    data_range: span of possible pixel values.
  Returns:
    (B,) float32, the mean SSIM over valid positions and channels; 1 for x == y.
  """
  _check_pair(x, y, "ssim")
  check(min(x.shape[1:3]) >= SSIM_WINDOW,
        f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} (its Gaussian window), "
        f"got {x.shape[1]}x{x.shape[2]}")
  scale = 1.0 / jnp.float32(data_range)
  x = x.astype(jnp.float32) * scale
  y = y.astype(jnp.float32) * scale
  w = jnp.asarray(gaussian_window(), jnp.float32)
  mu_x, mu_y = _filter_valid(x, w), _filter_valid(y, w)
  # (Co)variances are invariant to shifting each image: centre them first.
  xc = x - jnp.mean(x, axis=(1, 2), keepdims=True)
  yc = y - jnp.mean(y, axis=(1, 2), keepdims=True)
  mc_x, mc_y = _filter_valid(xc, w), _filter_valid(yc, w)
  var_x = _filter_valid(xc * xc, w) - mc_x * mc_x
  var_y = _filter_valid(yc * yc, w) - mc_y * mc_y
  cov = _filter_valid(xc * yc, w) - mc_x * mc_y
  c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
  s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)
       / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)))
  return jnp.mean(s, axis=(1, 2, 3))
