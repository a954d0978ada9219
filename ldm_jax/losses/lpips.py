"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric"), VGG16 trunk, version 0.1: the perceptual term of LDM's
autoencoder loss and an evaluation metric. Flax, NHWC, float32.

    x, y in [-1, 1] -> (v - shift) / scale -> VGG16 features at relu1_2, relu2_2,
    relu3_3, relu4_3, relu5_3 -> unit-normalise each feature vector over channels
    -> squared difference -> learned non-negative 1x1 head (no bias) -> mean over
    space -> sum over the five taps = distance per example (B,)

This computes what `lpips.LPIPS(net='vgg', version='0.1', lpips=True)` computes in
eval mode (tests/test_losses.py compares the two). Weights are data, read from local
files only (`load_lpips_params`): the VGG16 trunk from a torchvision-format state
dict (`vgg16-397923af.pth`, or a .safetensors with the same keys), the heads from
the `lpips` package's `weights/v0.1/vgg.pth` (`lpips_heads_path()` finds it in an
installed package without importing it).
"""

import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.convert import common
from ldm_jax.errors import UserError, check
from ldm_jax.models.layers import conv, partitioned

# torchvision's VGG16 `features` (configuration "D"): (index in the nn.Sequential,
# our name, in channels, out channels). Every conv is 3x3, padding 1, followed by a
# ReLU; a 2x2 / stride-2 max-pool precedes blocks 2-5. The index skips the ReLUs and
# pools, which have no weights.
VGG16_CONVS = (
    (0, "conv1_1", 3, 64), (2, "conv1_2", 64, 64),
    (5, "conv2_1", 64, 128), (7, "conv2_2", 128, 128),
    (10, "conv3_1", 128, 256), (12, "conv3_2", 256, 256), (14, "conv3_3", 256, 256),
    (17, "conv4_1", 256, 512), (19, "conv4_2", 512, 512), (21, "conv4_3", 512, 512),
    (24, "conv5_1", 512, 512), (26, "conv5_2", 512, 512), (28, "conv5_3", 512, 512),
)
TAP_CHANNELS = (64, 128, 256, 512, 512)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
# LPIPS v0.1 input normalisation, per RGB channel: (x - SHIFT) / SCALE.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10  # added to the channel norm (not under the square root), as the reference
MIN_SIZE = 16  # four 2x2 pools before relu5_3: smaller images leave it empty
HEADS_FILE = os.path.join("weights", "v0.1", "vgg.pth")


class VGG16Features(nn.Module):
  """The 13 convolutions of torchvision's VGG16 `features`, NHWC, float32.

  Returns the five LPIPS taps (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3) as a
  tuple; the final max-pool of torchvision's stack is not needed and not applied.
  Max-pools floor odd sizes, as PyTorch's default.
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
    taps, block = [], "1"
    for _, name, _, c_out in VGG16_CONVS:
      if name[4] != block:  # first conv of a new block: tap the previous one, pool
        taps.append(x)
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        block = name[4]
      x = conv(c_out, 3, padding=((1, 1), (1, 1)), name=name)(x)
      x = nn.relu(x)
    taps.append(x)
    return tuple(taps)


def _head_init(key, shape, dtype=jnp.float32):
  """Heads start as a plain channel mean (LPIPS' uncalibrated baseline)."""
  del key
  return jnp.full(shape, 1.0 / shape[2], dtype)


def _unit(f: jax.Array) -> jax.Array:
  """f / (||f||_channels + EPS). The norm's gradient is taken as 0 where a feature
  vector is exactly zero (the reference gives NaN there); values are unchanged."""
  sq = jnp.sum(f * f, axis=-1, keepdims=True)
  positive = sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
  return f / (norm + EPS)


class LPIPS(nn.Module):
  """LPIPS distance, VGG16 trunk, v0.1, per example.

  Call with two NHWC image batches of equal shape, values in [-1, 1], 3 channels
  or 1 (a 1-channel image is repeated to RGB, as `x.repeat(1, 3, 1, 1)` would before
  the reference), height and width at least 16. Returns (B,) float32 distances.
  Parameters: {"vgg": VGG16Features params, "lin0".."lin4": 1x1 head kernels
  (1, 1, C, 1)}, normally from `load_lpips_params` and kept frozen by the caller.
  """

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    check(x.shape == y.shape, f"LPIPS needs two images of one shape, got {x.shape} and "
          f"{y.shape}")
    check(x.ndim == 4 and x.shape[-1] in (1, 3),
          f"LPIPS takes NHWC images with 1 or 3 channels, got shape {x.shape}")
    check(min(x.shape[1:3]) >= MIN_SIZE,
          f"LPIPS (VGG16) needs images of at least {MIN_SIZE}x{MIN_SIZE}, got "
          f"{x.shape[1]}x{x.shape[2]}")
    vgg = VGG16Features(name="vgg")

    def taps(images):
      images = images.astype(jnp.float32)
      if images.shape[-1] == 1:
        images = jnp.repeat(images, 3, axis=-1)
      return vgg((images - jnp.asarray(SHIFT, jnp.float32)) / jnp.asarray(SCALE, jnp.float32))

    # Two trunk calls (shared weights), not one on the concatenated pair: a gradient
    # with respect to one image (the training step's reconstruction) then runs the VGG
    # backward over that image only.
    total = jnp.zeros((x.shape[0],), jnp.float32)
    for k, (fx, fy) in enumerate(zip(taps(x), taps(y))):
      diff = (_unit(fx) - _unit(fy)) ** 2
      head = nn.Conv(1, (1, 1), use_bias=False, name=f"lin{k}",
                     kernel_init=partitioned(_head_init, (None, None, "conv_in", "conv_out")))
      total = total + jnp.mean(head(diff), axis=(1, 2, 3))
    return total


def lpips_heads_path() -> str | None:
  """Path of `weights/v0.1/vgg.pth` inside an installed `lpips` package, or None.

  The package is located with `importlib.util.find_spec`, not imported (importing
  it imports torchvision).
  """
  try:
    spec = importlib.util.find_spec("lpips")
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  for folder in spec.submodule_search_locations:
    path = os.path.join(folder, HEADS_FILE)
    if os.path.isfile(path):
      return path
  return None


def vgg_rules() -> list[common.Rule]:
  """torchvision `features.{i}.weight/bias` -> our `vgg/conv{b}_{j}/kernel|bias`."""
  rules = []
  for index, name, c_in, c_out in VGG16_CONVS:
    rules += common.conv2d(f"vgg/{name}", f"features.{index}", c_in, c_out, 3)
  return rules


def head_rules() -> list[common.Rule]:
  """lpips `lin{k}.model.1.weight` (1, C, 1, 1) -> our `lin{k}/kernel` (1, 1, C, 1)."""
  return [common.Rule(f"lin{k}/kernel", (f"lin{k}.model.1.weight",), ((1, c, 1, 1),),
                      fwd=lambda w: w.transpose(2, 3, 1, 0),
                      inv=lambda k_: (k_.transpose(3, 2, 0, 1),))
          for k, c in enumerate(TAP_CHANNELS)]


def _read(path: str, expected: str) -> dict[str, np.ndarray]:
  if not os.path.isfile(path):
    raise UserError(f"{path}: no such file; expected {expected}")
  if path.endswith(".safetensors"):
    return common.load_safetensors(path)
  return common.load_torch_state_dict(path)


def load_lpips_params(vgg_path: str, heads_path: str | None = None) -> dict:
  """LPIPS parameters from local files, strictly checked.

  Args:
    vgg_path: torchvision VGG16 weights (`vgg16-397923af.pth` or any state dict with
      keys `features.{i}.weight/bias`; a `.safetensors` with those keys also works).
      `classifier.*` tensors are ignored; any other extra, missing or mis-shaped
      tensor is an error.
    heads_path: the lpips package's `weights/v0.1/vgg.pth` (keys
      `lin{k}.model.1.weight`); None uses `lpips_heads_path()`.
  Returns:
    Nested dict of float32 numpy arrays for `LPIPS().apply({"params": ...}, x, y)`.
  Raises:
    UserError naming a missing file or every problem with the tensors.
  """
  if heads_path is None:
    heads_path = lpips_heads_path()
    check(heads_path is not None, "no LPIPS heads file given and no installed lpips package "
          "holds one: pass the path of lpips' weights/v0.1/vgg.pth (pip install --no-deps "
          "lpips==0.1.4 provides it)")
  vgg = _read(vgg_path, "torchvision VGG16 weights (vgg16-397923af.pth-style state dict "
              "with features.{i}.weight/bias, or a .safetensors with those keys)")
  heads = _read(heads_path, "the LPIPS v0.1 VGG heads (the lpips package's "
                "weights/v0.1/vgg.pth, keys lin{k}.model.1.weight)")
  params = common.convert_tensors(vgg, vgg_rules(), what=f"VGG16 weights {vgg_path}",
                                  ignore=[k for k in vgg if k.startswith("classifier.")])
  params.update(common.convert_tensors(heads, head_rules(),
                                       what=f"LPIPS heads {heads_path}"))
  return params
