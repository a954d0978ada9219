"""The PatchGAN discriminator and GAN losses of LDM's autoencoder training
(Isola et al. 2017's pix2pix discriminator as used by Esser et al. 2021 / taming and
Rombach et al. 2022), NHWC.

    conv 4x4 /2 (ndf) + LeakyReLU(0.2)
    n_layers - 1 x [conv 4x4 /2 (ndf * min(2^n, 8)) + norm + LeakyReLU(0.2)]
    conv 4x4 /1 (ndf * min(2^n_layers, 8)) + norm + LeakyReLU(0.2)
    conv 4x4 /1 (1)  -> logits map, one per overlapping patch

Every conv pads 1 pixel on each side, as PyTorch's `padding=1` (a 4x4 kernel with
symmetric padding: not "SAME"). Convs followed by batch norm have no bias.

Batch normalisation ("batch") always normalises with the statistics of the batch it
is given, as the reference does (its discriminator is in train mode whenever a loss
is computed); no running averages are kept, so the discriminator has parameters
only. Under `jit` with a batch sharded over devices the mean and variance are global
over the whole batch (under `shard_map` / `pmap` they would be per device). Real and
fake images in separate calls are normalised separately, as in LDM.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.errors import check
from ldm_jax.models.layers import partitioned

NORMS = ("batch", "group", "none")
BN_EPS = 1e-5  # torch.nn.BatchNorm2d's default
LEAK = 0.2
# Parameters of the default NLayerDiscriminator (ndf=64, n_layers=3, 3 input channels,
# batch norm); equal to the PyTorch reference's count (tests/test_losses.py).
DEFAULT_NUM_PARAMS = 2_765_633


class BatchStatNorm(nn.Module):
  """Batch normalisation over (N, H, W) with the current batch's statistics
  (biased variance, as PyTorch in train mode), learned scale and bias per channel."""
  epsilon: float = BN_EPS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    scale = self.param("scale", partitioned(_normal(1.0, 0.02), ("norm",)), (channels,),
                       jnp.float32)
    bias = self.param("bias", partitioned(nn.initializers.zeros, ("norm",)), (channels,),
                      jnp.float32)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(x32 - mean), axis=(0, 1, 2))
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
    return (y * scale + bias).astype(x.dtype)


def _normal(mean: float, std: float):
  def init(key, shape, dtype=jnp.float32):
    return mean + std * jax.random.normal(key, shape, dtype)
  return init


class NLayerDiscriminator(nn.Module):
  """PatchGAN discriminator: NHWC images (any channel count) -> NHWC logits (.., 1).

  Initialised as taming's `weights_init`: conv kernels N(0, 0.02), norm scales
  N(1, 0.02), biases 0.

  Attributes:
    ndf: width of the first conv.
    n_layers: number of stride-2 convs (the output shrinks ~2^n_layers).
    norm: "batch" (batch statistics, see module doc), "group" (GroupNorm with
      `groups` groups, eps 1e-5) or "none".
    groups: GroupNorm groups when norm="group"; must divide every normalised width.
  """
  ndf: int = 64
  n_layers: int = 3
  norm: str = "batch"
  groups: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    check(self.norm in NORMS, f"unknown discriminator norm {self.norm!r}; valid: {list(NORMS)}")
    check(self.n_layers >= 1, f"discriminator n_layers={self.n_layers} must be >= 1")
    check(self.ndf >= 1, f"discriminator ndf={self.ndf} must be >= 1")
    x = x.astype(jnp.float32)
    x = nn.leaky_relu(self._conv(self.ndf, 2, True, "conv_0")(x), LEAK)
    for n in range(1, self.n_layers + 1):
      width = self.ndf * min(2 ** n, 8)
      stride = 2 if n < self.n_layers else 1
      x = self._conv(width, stride, self.norm != "batch", f"conv_{n}")(x)
      x = nn.leaky_relu(self._norm(width, f"norm_{n}")(x), LEAK)
    return self._conv(1, 1, True, "conv_out")(x)

  def _conv(self, features: int, stride: int, bias: bool, name: str) -> nn.Conv:
    return nn.Conv(features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
                   use_bias=bias, name=name,
                   kernel_init=partitioned(_normal(0.0, 0.02),
                                           (None, None, "conv_in", "conv_out")),
                   bias_init=partitioned(nn.initializers.zeros, ("conv_out",)))

  def _norm(self, width: int, name: str):
    if self.norm == "batch":
      return BatchStatNorm(name=name)
    if self.norm == "group":
      check(width % self.groups == 0,
            f"discriminator width {width} (ndf={self.ndf}) is not divisible by "
            f"groups={self.groups}; pick ndf and groups so every width ndf*2^n divides")
      return nn.GroupNorm(num_groups=self.groups, epsilon=BN_EPS, name=name,
                          dtype=jnp.float32,
                          scale_init=partitioned(_normal(1.0, 0.02), ("norm",)),
                          bias_init=partitioned(nn.initializers.zeros, ("norm",)))
    return lambda h: h


# -- losses ------------------------------------------------------------------------------

def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """Discriminator hinge loss: 0.5 * (mean relu(1 - real) + mean relu(1 + fake))."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real))
                + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """Discriminator non-saturating loss: 0.5 * (mean softplus(-real) + mean softplus(fake))."""
  return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real))
                + jnp.mean(jax.nn.softplus(logits_fake)))


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def d_loss(kind: str, logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """The discriminator loss `kind` (a key of D_LOSSES)."""
  check(kind in D_LOSSES, f"unknown discriminator loss {kind!r}; valid: {sorted(D_LOSSES)}")
  return D_LOSSES[kind](logits_real, logits_fake)


def generator_loss(logits_fake: jax.Array) -> jax.Array:
  """The autoencoder's adversarial loss, -mean(D(x^)), as LDM uses with either D loss."""
  return -jnp.mean(logits_fake)


def adaptive_weight(rec_grad: jax.Array, gan_grad: jax.Array, delta: float = 1e-4,
                    max_weight: float = 1e4) -> jax.Array:
  """Esser et al.'s adaptive GAN weight lambda = ||grad rec|| / (||grad gan|| + delta),
  clipped to [0, max_weight], without gradient.

  Args:
    rec_grad: gradient of the reconstruction (NLL) loss w.r.t. the decoder's last
      layer kernel.
    gan_grad: gradient of the generator loss w.r.t. the same kernel.
  """
  rec = jnp.sqrt(jnp.sum(jnp.square(rec_grad.astype(jnp.float32))))
  gan = jnp.sqrt(jnp.sum(jnp.square(gan_grad.astype(jnp.float32))))
  return jax.lax.stop_gradient(jnp.clip(rec / (gan + delta), 0.0, max_weight))
