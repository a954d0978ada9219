"""Tiled autoencoder encode / decode: parity with diffusers' tiled AutoencoderKL, exact
when one tile covers the image, the (inexact) agreement with untiled decoding on a
smooth image, chunked calls, and the errors."""

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from ldm_jax.convert import vae as cvae  # noqa: E402
from ldm_jax.errors import UserError  # noqa: E402
from ldm_jax.models import vae, vae_tiling  # noqa: E402

TOL = 1e-5  # max |ours - ref| / max |ref|
KL = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
          down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
VQ = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=3,
          vq_embed_dim=3, num_vq_embeddings=16, down_block_types=("DownEncoderBlock2D",) * 2,
          up_block_types=("UpDecoderBlock2D",) * 2)
# 64x80 images (32x40 latents, f = 2) in 32-pixel tiles: stride 24 pixels, 3 x 4 tiles
# whose last row / column are cut short (16 / 8 pixels), so all four tile shapes occur.
# Encoding is tested on the top 24 rows (one row of tiles: two shapes, half the compiles;
# the blending code is the same for both directions and checked in 2-D by decoding).
HEIGHT, WIDTH, TILE, ENCODE_HEIGHT = 64, 80, 32, 24


def _rel(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


@functools.lru_cache(maxsize=None)
def _pair(kind):
  """A tiny random diffusers model (norms and biases perturbed) and ours from it."""
  torch.manual_seed(0)
  ref = (diffusers.AutoencoderKL(**KL) if kind == "kl" else diffusers.VQModel(**VQ)).eval()
  with torch.no_grad():
    for q in ref.parameters():
      if q.ndim == 1:
        q.add_(0.1 * torch.randn_like(q))
  params, config = cvae.from_diffusers_state_dict(
      ref.state_dict(), dict(ref.config, _class_name=type(ref).__name__))
  return ref, vae.make(config), params


def _smooth_images(batch=2, height=HEIGHT, width=WIDTH):
  yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
  channels = [np.sin(2 * np.pi * (xx + 0.5 * yy)), np.cos(3 * np.pi * yy * xx),
              np.sin(np.pi * (xx - yy))]
  img = 0.8 * np.stack(channels, -1)[None] * np.linspace(1, 0.5, batch)[:, None, None, None]
  return img.astype(np.float32)


def _untiled(model, params, method, x):
  return vae_tiling._jitted(model, method)({"params": params}, x)  # shares compilations


def test_matches_diffusers_tiled_autoencoder():
  ref, model, params = _pair("kl")
  ref.enable_tiling()  # diffusers 0.42 keeps the tile sizes as plain attributes
  ref.tile_sample_min_size, ref.tile_latent_min_size = TILE, TILE // 2
  assert ref.tile_overlap_factor == vae_tiling.DEFAULT_OVERLAP
  x = np.random.default_rng(0).uniform(-1, 1, (2, ENCODE_HEIGHT, WIDTH, 3)).astype(np.float32)
  z = np.random.default_rng(1).standard_normal((2, HEIGHT // 2, WIDTH // 2, 4)).astype(np.float32)
  with torch.no_grad():
    dist = ref.encode(_nchw(x)).latent_dist
    decoded = _nhwc(ref.decode(_nchw(z)).sample)
    ref.disable_tiling()
    untiled = _nhwc(ref.decode(_nchw(z)).sample)
  assert _rel(decoded, untiled) > 1e-3  # diffusers' tiling did change the result
  posterior = vae_tiling.tiled_encode(model, params, x, tile_size=TILE)
  image = vae_tiling.tiled_decode(model, params, z, tile_latent_size=TILE // 2)
  assert posterior.mean.shape == (2, ENCODE_HEIGHT // 2, WIDTH // 2, 4)
  assert image.shape == (2, HEIGHT, WIDTH, 3)
  errors = dict(mean=_rel(posterior.mean, _nhwc(dist.mean)),
                logvar=_rel(posterior.logvar, _nhwc(dist.logvar)), decode=_rel(image, decoded))
  print("tiled vs diffusers tiled: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
  assert max(errors.values()) <= TOL, errors
  # At most 3 tiles per call: the 6 interior tiles in two calls, the same result.
  chunked = vae_tiling.tiled_decode(model, params, z, tile_latent_size=TILE // 2,
                                    tiles_per_call=3)
  np.testing.assert_allclose(chunked, image, rtol=0, atol=1e-6 * float(np.max(np.abs(image))))


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_one_tile_is_untiled(kind):
  _, model, params = _pair(kind)
  x = _smooth_images(1, 32, 48)
  encoded = vae_tiling.tiled_encode(model, params, x, tile_size=48)
  reference = _untiled(model, params, "encode", x)
  if kind == "kl":
    np.testing.assert_array_equal(encoded.mean, reference.mean)
    np.testing.assert_array_equal(encoded.logvar, reference.logvar)
    z = np.asarray(reference.mean)
  else:
    np.testing.assert_array_equal(encoded, reference)
    z = np.asarray(reference)
  decoded = vae_tiling.tiled_decode(model, {"params": params}, z, tile_latent_size=24)
  np.testing.assert_array_equal(decoded, _untiled(model, params, "decode", z))


def test_smooth_image_close_to_untiled():
  """Tiles see their own GroupNorm statistics and attention context, so tiled decoding
  is close to, not equal to, untiled decoding (diffusers' tiling has the same limit);
  blending keeps the seams smoother than cutting. Random untrained weights exaggerate
  the gap: trained autoencoders depend less on the per-tile statistics."""
  ref, model, params = _pair("kl")
  x = _smooth_images()
  with torch.no_grad():  # the untiled references from diffusers (parity: tests/test_vae.py)
    z = _nhwc(ref.encode(_nchw(x)).latent_dist.mean)
    untiled = _nhwc(ref.decode(_nchw(z)).sample)
  stats = {}
  for overlap in (0.25, 0.0):
    tiled = np.asarray(vae_tiling.tiled_decode(model, params, z, tile_latent_size=TILE // 2,
                                               overlap=overlap))
    diff = np.abs(tiled - untiled)
    psnr = 20 * np.log10(np.ptp(untiled) / np.sqrt(np.mean(diff ** 2)))
    # Largest jump between neighbouring columns across the tile boundaries, beyond the
    # untiled image's jump there: a seam shows up as a discontinuity.
    stride = int(TILE // 2 * (1 - overlap)) * 2
    edges = np.arange(stride, WIDTH, stride)
    jump = np.abs(tiled[:, :, edges] - tiled[:, :, edges - 1])
    jump_ref = np.abs(untiled[:, :, edges] - untiled[:, :, edges - 1])
    stats[overlap] = dict(max=round(float(diff.max()), 3), mean=round(float(diff.mean()), 3),
                          psnr=round(float(psnr), 1), seam=round(float(np.max(jump - jump_ref)), 3))
  top = x[:, :ENCODE_HEIGHT]
  tiled_z = np.asarray(vae_tiling.tiled_encode(model, params, top, tile_size=TILE).mean)
  with torch.no_grad():
    z = _nhwc(ref.encode(_nchw(top)).latent_dist.mean)
  z_rms = float(np.sqrt(np.mean((tiled_z - z) ** 2)) / np.sqrt(np.mean(z ** 2)))
  print(f"tiled vs untiled decode (image range {np.ptp(untiled):.2f}), by overlap: {stats}; "
        f"encode: posterior mean relative RMS difference {z_rms:.3f}")
  blended, cut = stats[0.25], stats[0.0]
  assert blended["psnr"] > 20 and blended["mean"] < 0.1 * np.ptp(untiled)
  assert blended["seam"] < cut["seam"] and blended["psnr"] > cut["psnr"]
  assert z_rms < 0.5


def test_bad_arguments():
  _, model, params = _pair("kl")
  x = np.zeros((1, HEIGHT, WIDTH, 3), np.float32)
  with pytest.raises(UserError, match="tile_size 33 must be a positive multiple of the "
                                      "downsampling factor 2"):
    vae_tiling.tiled_encode(model, params, x, tile_size=33)
  with pytest.raises(UserError, match=r"overlap 0.75 out of range; valid: 0 <= overlap <= 0.5"):
    vae_tiling.tiled_encode(model, params, x, tile_size=32, overlap=0.75)
  with pytest.raises(UserError, match="image size 63x80 is not a multiple of the downsampling "
                                      "factor 2"):
    vae_tiling.tiled_encode(model, params, x[:, 1:], tile_size=32)
  with pytest.raises(UserError, match="tiles_per_call 0"):
    vae_tiling.tiled_decode(model, params, x[..., :4], tile_latent_size=8, tiles_per_call=0)
  with pytest.raises(UserError, match="force_not_quantize is for VQModel only"):
    vae_tiling.tiled_decode(model, params, x[..., :4], tile_latent_size=8,
                            force_not_quantize=True)
  with pytest.raises(UserError, match="model must be an AutoencoderKL or VQModel"):
    vae_tiling.tiled_decode(object(), params, x, tile_latent_size=8)
