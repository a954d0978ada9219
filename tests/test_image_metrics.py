"""PSNR and SSIM (ldm_jax.evaluation.image_metrics) against a numpy formula and
scikit-image's `structural_similarity` (Wang et al. 2004 settings), on random and
structured images. scikit-image is required: without it this file fails."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

try:
  from skimage.metrics import structural_similarity
except ImportError as e:  # a failure, not a skip: the SSIM reference must be checked
  raise ImportError("tests/test_image_metrics.py needs scikit-image: "
                    "pip install scikit-image==0.26.0") from e

from ldm_jax.errors import UserError
from ldm_jax.evaluation.image_metrics import gaussian_window, psnr, ssim

SSIM_TOL = 1e-5  # absolute, float32 ours vs float64 scikit-image


def _skimage_ssim(x, y, data_range):
  return np.array([structural_similarity(a, b, data_range=data_range, gaussian_weights=True,
                                         sigma=1.5, use_sample_covariance=False,
                                         channel_axis=-1)
                   for a, b in zip(np.float64(x), np.float64(y))])


def _structured(size, channels, seed):
  """Smooth ramps, a sinusoid, a disc and a checkerboard, one per example, in [0, 1]."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
  disc = ((yy - 0.5) ** 2 + (xx - 0.4) ** 2 < 0.1).astype(float)
  checker = ((np.arange(size)[:, None] // 4 + np.arange(size)[None] // 4) % 2).astype(float)
  bases = [0.2 + 0.6 * xx * yy, 0.5 + 0.4 * np.sin(6 * xx + 3 * yy), 0.1 + 0.8 * disc,
           checker]
  out = np.stack([np.stack([np.roll(b, c, axis=1) for c in range(channels)], -1)
                  for b in bases])
  return out + 0.02 * rng.standard_normal(out.shape)


def _degrade(x, seed, data_range):
  """Noisy, shifted, contrast-changed and blurred versions of x."""
  rng = np.random.default_rng(seed)
  noisy = x + 0.1 * data_range * rng.standard_normal(x.shape)
  shifted = np.roll(x, 2, axis=1)
  contrast = 0.5 * x + 0.3 * data_range
  blurred = (x + np.roll(x, 1, axis=1) + np.roll(x, 1, axis=2) + np.roll(x, -1, axis=2)) / 4
  return np.stack([noisy[0], shifted[1 % len(x)], contrast[2 % len(x)],
                   blurred[3 % len(x)]])[:len(x)]


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3)])
@pytest.mark.parametrize("data_range", [1.0, 255.0])
def test_ssim_matches_skimage(size, channels, data_range):
  fn = jax.jit(ssim, static_argnums=2)
  rng = np.random.default_rng(size + channels)
  random_x = rng.uniform(0, data_range, (4, size, size, channels))
  structured_x = _structured(size, channels, seed=1) * data_range
  worst = 0.0
  for x in (random_x, structured_x):
    y = _degrade(x, seed=2, data_range=data_range)
    want = _skimage_ssim(x, y, data_range)
    got = np.asarray(fn(jnp.float32(x), jnp.float32(y), data_range))
    assert got.shape == (4,) and got.dtype == np.float32
    worst = max(worst, float(np.max(np.abs(got - want))))
    assert np.ptp(want) > 0.05  # the pairs really differ in SSIM
  print(f"SSIM {size}x{size}x{channels} range {data_range}: max |ours - skimage| = {worst:.2e}")
  assert worst <= SSIM_TOL


def test_gaussian_window_is_scipys():
  from scipy.ndimage import gaussian_filter1d  # pylint: disable=import-outside-toplevel
  impulse = np.zeros(11)
  impulse[5] = 1.0
  want = gaussian_filter1d(impulse, sigma=1.5, truncate=3.5, mode="constant")
  np.testing.assert_allclose(gaussian_window(), want, rtol=1e-12)


def test_ssim_identity_and_monotone():
  x = _structured(32, 3, seed=3)
  rng = np.random.default_rng(4)
  noise = rng.standard_normal(x.shape)
  np.testing.assert_allclose(ssim(jnp.float32(x), jnp.float32(x), 1.0), 1.0, atol=1e-6)
  values, psnrs = [], []
  for sigma in (0.01, 0.05, 0.1, 0.2):
    y = jnp.float32(x + sigma * noise)
    values.append(np.asarray(ssim(jnp.float32(x), y, 1.0)))
    psnrs.append(np.asarray(psnr(jnp.float32(x), y, 1.0)))
  assert np.all(np.diff(np.stack(values), axis=0) < 0), values
  assert np.all(np.diff(np.stack(psnrs), axis=0) < 0), psnrs


@pytest.mark.parametrize("data_range", [1.0, 2.0, 255.0])
def test_psnr_matches_numpy(data_range):
  rng = np.random.default_rng(5)
  x = rng.uniform(0, data_range, (3, 16, 12, 3))
  y = x + data_range * rng.uniform(0.01, 0.2, (3, 1, 1, 1)) * rng.standard_normal(x.shape)
  want = [10 * np.log10(data_range ** 2 / np.mean((a - b) ** 2)) for a, b in zip(x, y)]
  got = np.asarray(jax.jit(psnr, static_argnums=2)(jnp.float32(x), jnp.float32(y),
                                                   data_range))
  assert got.shape == (3,)
  np.testing.assert_allclose(got, want, atol=1e-4)
  assert np.ptp(want) > 5
  assert np.all(np.isposinf(np.asarray(psnr(jnp.float32(x), jnp.float32(x), data_range))))


def test_metric_errors():
  a = jnp.zeros((1, 16, 16, 3))
  with pytest.raises(UserError, match="one shape"):
    ssim(a, jnp.zeros((1, 16, 16, 1)), 1.0)
  with pytest.raises(UserError, match="one shape"):
    psnr(a, jnp.zeros((2, 16, 16, 3)), 1.0)
  with pytest.raises(UserError, match="at least 11x11"):
    ssim(jnp.zeros((1, 10, 16, 1)), jnp.zeros((1, 10, 16, 1)), 1.0)
  with pytest.raises(UserError, match="NHWC"):
    psnr(jnp.zeros((16, 16, 3)), jnp.zeros((16, 16, 3)), 1.0)
