"""A time-conditional classifier of noisy images x_t, for classifier guidance
(Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", section 4).

The encoder half of the compact U-Net: pixel-unshuffle stem, residual blocks whose
group norms are modulated by the timestep embedding, strided-conv downsampling,
then group norm, SiLU, global average pooling and a linear head giving logits over
`num_classes`. Called like a denoiser, `model.apply(v, x_t, model_time, labels=None,
train=False)`; the labels argument is accepted (and ignored) so it is built, traced
and checkpointed by the same code as the denoisers.
"""

import flax.linen as nn
import jax.numpy as jnp

from ldm_jax.errors import check
from ldm_jax.models.compact_unet import ResBlock, space_to_depth
from ldm_jax.models.embeddings import timestep_features
from ldm_jax.models.layers import Dtype, conv, dense, group_norm
from ldm_jax.models.registry import variant_kwargs

VARIANTS = {
    # MNIST: 28x28 -> 14x14 (32 ch) -> 7x7 (64 ch) -> pooled 64 -> 10 logits.
    "mnist": dict(channels=(32, 64), num_res_blocks=1, downscale=2, groups=8),
    "tiny": dict(channels=(8, 16), num_res_blocks=1, downscale=2, groups=4),
}


class NoisyClassifier(nn.Module):
  """Logits (B, num_classes) of p(y | x_t, t) for (B, H, W, C) noisy images."""
  input_size: int = 28
  in_channels: int = 1
  channels: tuple = (32, 64)
  num_res_blocks: int = 1
  downscale: int = 2
  groups: int = 8
  num_classes: int = 10
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, t, y=None, train: bool = False):
    del y, train  # a classifier: no label input, no dropout
    _, height, width, _ = x.shape
    stride = self.downscale * 2 ** (len(self.channels) - 1)
    check(height % stride == 0 and width % stride == 0,
          f"NoisyClassifier: image size {height}x{width} must be divisible by {stride} "
          f"(downscale {self.downscale} x 2^{len(self.channels) - 1} levels)")
    check(self.num_classes > 0, f"NoisyClassifier needs data.num_classes > 0, got "
                                f"{self.num_classes}")
    emb_dim = 4 * self.channels[0]
    emb = timestep_features(t, self.channels[0])
    emb = dense(emb_dim, (None, "mlp"), name="time_mlp_0", dtype=self.dtype)(emb)
    emb = dense(emb_dim, ("mlp", "embed"), name="time_mlp_1", dtype=self.dtype)(nn.silu(emb))

    h = space_to_depth(x.astype(self.dtype), self.downscale)
    h = conv(self.channels[0], 3, name="stem", dtype=self.dtype)(h)
    for level, features in enumerate(self.channels):
      for i in range(self.num_res_blocks):
        h = ResBlock(features, self.groups, self.dtype, name=f"down_{level}_{i}")(h, emb)
      if level < len(self.channels) - 1:
        h = conv(self.channels[level + 1], 3, strides=2, name=f"downsample_{level}",
                 dtype=self.dtype)(h)
    h = ResBlock(self.channels[-1], self.groups, self.dtype, name="mid")(h, emb)
    h = nn.silu(group_norm(self.groups, name="norm_out")(h))
    pooled = h.astype(jnp.float32).mean(axis=(1, 2))
    logits = dense(self.num_classes, ("conv_out", "classes"), name="head", dtype=self.dtype)(pooled)
    return logits.astype(jnp.float32)


def build(model_config, **overrides) -> NoisyClassifier:
  """A `NoisyClassifier` from `config.model` (`variant` from VARIANTS plus overrides)."""
  return NoisyClassifier(**variant_kwargs(NoisyClassifier, VARIANTS, model_config, overrides))


def logits_fn(model, params):
  """`(x_t, model_time) -> logits` for `params` of `model`."""
  def apply(x_t, model_time):
    return model.apply({"params": params}, x_t, model_time)
  return apply
