"""A compact pixel-space U-Net for small images (the CPU quickstart's denoiser).

Pixel-unshuffle stem (space-to-depth by `downscale`), residual blocks with
scale-shift conditioning on time + class (ADM's "adaptive group norm"), strided-conv
downsampling, nearest-neighbour upsampling, skip concatenations, zero-initialised
output, pixel-shuffle back to full resolution. No attention: on a CPU, convolutions
at 14×14 and 7×7 buy far more quality per second than attention at 28×28.
The full LDM / ADM U-Nets live in their own files (later issue).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.errors import check
from ldm_jax.models.registry import variant_kwargs
from ldm_jax.models.embeddings import ClassEmbedder, timestep_features
from ldm_jax.models.layers import Dtype, conv, dense, group_norm

VARIANTS = {
    # MNIST quickstart: 28x28 -> 14x14 (32 ch) -> 7x7 (64 ch).
    "mnist": dict(channels=(32, 64), num_res_blocks=2, downscale=2, groups=8),
    "mnist-shallow": dict(channels=(32, 64), num_res_blocks=1, downscale=2, groups=8),
    "tiny": dict(channels=(16, 32), num_res_blocks=1, downscale=2, groups=4),
}


def space_to_depth(x: jax.Array, factor: int) -> jax.Array:
  """(B, H, W, C) -> (B, H/f, W/f, C*f*f): pixel unshuffle."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // factor, factor, w // factor, factor, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // factor, w // factor, factor * factor * c)


def depth_to_space(x: jax.Array, factor: int) -> jax.Array:
  """Inverse of `space_to_depth`: pixel shuffle."""
  b, h, w, c = x.shape
  c_out = c // (factor * factor)
  x = x.reshape(b, h, w, factor, factor, c_out)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * factor, w * factor, c_out)


class ResBlock(nn.Module):
  """GN -> SiLU -> conv -> GN·(1+scale)+shift -> SiLU -> conv (zero-init) + skip."""
  features: int
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, emb):
    h = nn.silu(group_norm(self.groups, name="norm1")(x))
    h = conv(self.features, 3, name="conv1", dtype=self.dtype)(h)
    scale, shift = jnp.split(dense(2 * self.features, ("embed", "conv_out"), name="emb_proj",
                                   dtype=self.dtype)(nn.silu(emb)), 2, -1)
    h = group_norm(self.groups, name="norm2")(h) * (1 + scale[:, None, None]) + shift[:, None, None]
    h = conv(self.features, 3, name="conv2", kernel_init=nn.initializers.zeros,
             dtype=self.dtype)(nn.silu(h))
    if x.shape[-1] != self.features:
      x = conv(self.features, 1, name="skip", dtype=self.dtype)(x)
    return x + h


class CompactUNet(nn.Module):
  """Class-conditional U-Net on (B, H, W, C) images; returns (B, H, W, out_channels)."""
  input_size: int = 28
  in_channels: int = 1
  channels: tuple = (48, 96)
  num_res_blocks: int = 2
  downscale: int = 2
  groups: int = 8
  num_classes: int = 10
  class_dropout_prob: float = 0.1
  learn_sigma: bool = False
  dtype: Dtype = jnp.float32

  @property
  def out_channels(self) -> int:
    return self.in_channels * (2 if self.learn_sigma else 1)

  @property
  def null_class(self) -> int:
    return self.num_classes

  @nn.compact
  def __call__(self, x, t, y, train: bool = False):
    _, height, width, _ = x.shape
    stride = self.downscale * 2 ** (len(self.channels) - 1)
    check(height % stride == 0 and width % stride == 0,
          f"CompactUNet: image size {height}x{width} must be divisible by {stride} "
          f"(downscale {self.downscale} x 2^{len(self.channels) - 1} levels)")
    emb_dim = 4 * self.channels[0]
    emb = timestep_features(t, self.channels[0])
    emb = dense(emb_dim, (None, "mlp"), name="time_mlp_0", dtype=self.dtype)(emb)
    emb = dense(emb_dim, ("mlp", "embed"), name="time_mlp_1", dtype=self.dtype)(nn.silu(emb))
    emb = emb + ClassEmbedder(self.num_classes, emb_dim, self.class_dropout_prob,
                              name="class_embedder")(y, train)

    h = space_to_depth(x.astype(self.dtype), self.downscale)
    h = conv(self.channels[0], 3, name="stem", dtype=self.dtype)(h)
    skips = [h]
    for level, features in enumerate(self.channels):  # down path
      for i in range(self.num_res_blocks):
        h = ResBlock(features, self.groups, self.dtype, name=f"down_{level}_{i}")(h, emb)
        skips.append(h)
      if level < len(self.channels) - 1:
        h = conv(features, 3, strides=2, name=f"downsample_{level}", dtype=self.dtype)(h)
        skips.append(h)
    h = ResBlock(self.channels[-1], self.groups, self.dtype, name="mid")(h, emb)
    for level in reversed(range(len(self.channels))):  # up path
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = ResBlock(self.channels[level], self.groups, self.dtype, name=f"up_{level}_{i}")(h, emb)
      if level > 0:
        b, hh, ww, c = h.shape
        h = jax.image.resize(h, (b, hh * 2, ww * 2, c), "nearest")
        h = conv(self.channels[level - 1], 3, name=f"upsample_{level}", dtype=self.dtype)(h)
    h = nn.silu(group_norm(self.groups, name="norm_out")(h))
    h = conv(self.out_channels * self.downscale ** 2, 3, name="conv_out",
             kernel_init=nn.initializers.zeros, dtype=self.dtype)(h)
    return depth_to_space(h, self.downscale).astype(jnp.float32)


def build(model_config, **overrides) -> CompactUNet:
  """A `CompactUNet` from `config.model` (`variant` from VARIANTS plus overrides)."""
  return CompactUNet(**variant_kwargs(CompactUNet, VARIANTS, model_config, overrides))
