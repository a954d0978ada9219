"""The LDM / Stable Diffusion autoencoders: KL-regularised (`AutoencoderKL`) and
vector-quantised (`VQModel`), NHWC.

    image (B, H, W, 3) -> Encoder -> [quant_conv] -> posterior | quantizer -> latents
    latents (B, H/f, W/f, C) -> [post_quant_conv] -> Decoder -> image

Encoder: conv_in, one down block per entry of `block_out_channels` (ResNet blocks,
then a stride-2 conv on (0, 1)-padded input except at the last level), a mid block
(ResNet, single-head spatial self-attention, ResNet), GroupNorm + SiLU, conv_out.
The Decoder mirrors it with one more ResNet per up block and nearest-neighbour 2x
upsampling + conv. Names mirror diffusers' `AutoencoderKL` / `VQModel` (down_blocks,
resnets, attentions, mid_block, conv_norm_out, quant_conv, ...) so the converter in
`ldm_jax/convert/vae.py` is near-identity; the down/up samplers are `downsample` /
`upsample` and attention q/k/v/out are Dense layers (1x1 convs in LDM) `to_q` ...
`to_out`. Decoder up block 0 is the lowest resolution, as in diffusers.

Each VARIANTS row carries the latent `scaling_factor` / `shift_factor` it is used
with; `to_latent` / `from_latent` apply them (the only place they live).
"""

from typing import Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.errors import check
from ldm_jax.models.attention import BACKENDS, dot_product_attention
from ldm_jax.models.layers import Dtype, compute_dtype, conv, dense, group_norm, partitioned
from ldm_jax.models.registry import variant_kwargs

NORM_EPS = 1e-6  # every GroupNorm of the LDM / diffusers autoencoder
LOGVAR_RANGE = (-30.0, 20.0)  # the posterior's log-variance clip (LDM and diffusers)

_SD = dict(kind="kl", block_out_channels=(128, 256, 512, 512), layers_per_block=2,
           latent_channels=4)
VARIANTS = {
    # Stable Diffusion 1.x / 2.x (diffusers' stabilityai/sd-vae-ft-*; LDM kl-f8).
    "sd": dict(_SD, scaling_factor=0.18215, shift_factor=0.0),
    # SDXL: same architecture, retrained, its own scale (diffusers' SDXL vae config).
    "sdxl": dict(_SD, scaling_factor=0.13025, shift_factor=0.0),
    # SD3: 16 latent channels, no quant convs (diffusers' SD3 vae config).
    "sd3": dict(_SD, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                scaling_factor=1.5305, shift_factor=0.0609),
    # CompVis/latent-diffusion models/first_stage_models/*/config.yaml; their LDMs use
    # the default scale_factor 1.0.
    "kl-f4": dict(kind="kl", block_out_channels=(128, 256, 512), layers_per_block=2,
                  latent_channels=3, scaling_factor=1.0, shift_factor=0.0),
    "vq-f4": dict(kind="vq", block_out_channels=(128, 256, 512), layers_per_block=2,
                  latent_channels=3, embed_dim=3, num_embeddings=8192,
                  scaling_factor=1.0, shift_factor=0.0),
    # attn_resolutions [32] at resolution 256: attention after every ResNet of the
    # lowest-resolution level (encoder level 3, decoder up block 0).
    "vq-f8": dict(kind="vq", block_out_channels=(128, 256, 256, 512), layers_per_block=2,
                  latent_channels=4, embed_dim=4, num_embeddings=16384, attention_levels=(3,),
                  scaling_factor=1.0, shift_factor=0.0),
    # Tiny ones for tests and CPU demos.
    "tiny-kl": dict(kind="kl", block_out_channels=(16, 32), layers_per_block=1,
                    latent_channels=4, norm_groups=8, scaling_factor=1.0, shift_factor=0.0),
    "tiny-vq": dict(kind="vq", block_out_channels=(16, 32), layers_per_block=1,
                    latent_channels=3, embed_dim=3, num_embeddings=64, norm_groups=8,
                    attention_levels=(1,), scaling_factor=1.0, shift_factor=0.0),
    # MNIST-sized f4 autoencoders for the CPU demonstrations (configs/vae_mnist.py):
    # 28x28 digits -> 7x7 latents. Trained here, so no published scale: their latent
    # caches use cache.scale="auto" (LDM's scale_by_std), recorded in the manifest.
    "mnist-kl-f4": dict(kind="kl", block_out_channels=(32, 64, 64), layers_per_block=1,
                        latent_channels=4, norm_groups=16, scaling_factor=1.0,
                        shift_factor=0.0),
    "mnist-vq-f4": dict(kind="vq", block_out_channels=(32, 64, 64), layers_per_block=1,
                        latent_channels=4, embed_dim=4, num_embeddings=1024, norm_groups=16,
                        scaling_factor=1.0, shift_factor=0.0),
    # The captioned shapes at 64x64 (configs/mmdit_256.py:shapes_vae): -> 16x16x4
    # latents for the shapes MM-DiT; trained with an L2 loss (L1 leaves the sparse
    # blue shapes out for hundreds of steps: BUILD_NOTES).
    "shapes-kl-f4": dict(kind="kl", block_out_channels=(16, 32, 64), layers_per_block=1,
                         latent_channels=4, norm_groups=8, scaling_factor=1.0,
                         shift_factor=0.0),
}


class ResnetBlock(nn.Module):
  """GroupNorm -> SiLU -> conv3x3, twice, plus a residual (1x1 conv if widths differ)."""
  out_channels: int
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.silu(group_norm(self.groups, name="norm1", epsilon=NORM_EPS)(x))
    h = conv(self.out_channels, 3, name="conv1", dtype=self.dtype)(h)
    h = nn.silu(group_norm(self.groups, name="norm2", epsilon=NORM_EPS)(h))
    h = conv(self.out_channels, 3, name="conv2", dtype=self.dtype)(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, name="conv_shortcut", dtype=self.dtype)(x)
    return x + h


class AttentionBlock(nn.Module):
  """Single-head self-attention over all H*W positions, pre-GroupNorm, residual."""
  groups: int
  dtype: Dtype = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    h = group_norm(self.groups, name="group_norm", epsilon=NORM_EPS)(x)
    h = h.reshape(batch, height * width, 1, channels).astype(self.dtype)  # (B, T, 1, C)
    # q/k/v/out are 1x1 convolutions in LDM: channel axes named as a conv's.
    proj = lambda name: dense(channels, ("conv_in", "conv_out"), name=name, dtype=self.dtype)
    q, k, v = proj("to_q")(h), proj("to_k")(h), proj("to_v")(h)
    out = dot_product_attention(q, k, v, backend=self.attention)  # (B, T, 1, C)
    out = proj("to_out")(out.reshape(batch, height * width, channels))
    return x + out.reshape(x.shape).astype(x.dtype)


class MidBlock(nn.Module):
  """ResNet -> attention (optional) -> ResNet at constant width."""
  groups: int
  add_attention: bool = True
  dtype: Dtype = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    x = ResnetBlock(channels, self.groups, self.dtype, name="resnets_0")(x)
    if self.add_attention:
      x = AttentionBlock(self.groups, self.dtype, self.attention, name="attentions_0")(x)
    return ResnetBlock(channels, self.groups, self.dtype, name="resnets_1")(x)


class ResolutionBlock(nn.Module):
  """`num_layers` ResNets (each followed by attention if `add_attention`), then an
  optional 2x down- (encoder) or up-sampling (decoder)."""
  out_channels: int
  num_layers: int
  groups: int
  resample: str = "none"  # "down", "up" or "none"
  add_attention: bool = False
  dtype: Dtype = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets_{j}")(x)
      if self.add_attention:
        x = AttentionBlock(self.groups, self.dtype, self.attention, name=f"attentions_{j}")(x)
    if self.resample == "down":  # LDM pads right/bottom only, then a VALID stride-2 conv
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
      x = conv(self.out_channels, 3, strides=2, padding="VALID", name="downsample",
               dtype=self.dtype)(x)  # (B, H/2, W/2, C)
    elif self.resample == "up":
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest neighbour (B, 2H, 2W, C)
      x = conv(self.out_channels, 3, name="upsample", dtype=self.dtype)(x)
    return nn.with_logical_constraint(x, ("batch", None, None, "act_embed"))


class Encoder(nn.Module):
  """Image (B, H, W, in) -> moments (B, H/f, W/f, out_channels), f = 2^(levels-1)."""
  out_channels: int
  block_out_channels: Sequence[int]
  layers_per_block: int
  groups: int
  mid_attention: bool = True
  attention_levels: Sequence[int] = ()
  dtype: Dtype = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    levels = len(self.block_out_channels)
    factor = 2 ** (levels - 1)
    height, width = x.shape[1:3]
    check(height % factor == 0 and width % factor == 0,
          f"autoencoder: image size {height}x{width} is not a multiple of the downsampling "
          f"factor {factor} ({levels} levels); crop or pad to a multiple of {factor}")
    h = conv(self.block_out_channels[0], 3, name="conv_in", dtype=self.dtype)(x)
    for i, channels in enumerate(self.block_out_channels):
      h = ResolutionBlock(channels, self.layers_per_block, self.groups,
                          resample="down" if i < levels - 1 else "none",
                          add_attention=i in self.attention_levels, dtype=self.dtype,
                          attention=self.attention, name=f"down_blocks_{i}")(h)
    h = MidBlock(self.groups, self.mid_attention, self.dtype, self.attention,
                 name="mid_block")(h)
    h = nn.silu(group_norm(self.groups, name="conv_norm_out", epsilon=NORM_EPS)(h))
    return conv(self.out_channels, 3, name="conv_out", dtype=self.dtype)(h)


class Decoder(nn.Module):
  """Latents (B, h, w, C) -> image (B, f h, f w, out_channels)."""
  out_channels: int
  block_out_channels: Sequence[int]
  layers_per_block: int
  groups: int
  mid_attention: bool = True
  attention_levels: Sequence[int] = ()
  dtype: Dtype = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    levels = len(self.block_out_channels)
    h = conv(self.block_out_channels[-1], 3, name="conv_in", dtype=self.dtype)(z)
    h = MidBlock(self.groups, self.mid_attention, self.dtype, self.attention,
                 name="mid_block")(h)
    for i, channels in enumerate(reversed(self.block_out_channels)):
      h = ResolutionBlock(channels, self.layers_per_block + 1, self.groups,
                          resample="up" if i < levels - 1 else "none",
                          add_attention=(levels - 1 - i) in self.attention_levels,
                          dtype=self.dtype, attention=self.attention, name=f"up_blocks_{i}")(h)
    h = nn.silu(group_norm(self.groups, name="conv_norm_out", epsilon=NORM_EPS)(h))
    # The last layer's input, for LDM's adaptive GAN weight (apply with
    # mutable=["intermediates"]; a no-op otherwise).
    self.sow("intermediates", "conv_out_input", h)
    return conv(self.out_channels, 3, name="conv_out", dtype=self.dtype)(h)


@flax.struct.dataclass
class DiagonalGaussian:
  """The KL autoencoder's posterior N(mean, exp(logvar)); fields (B, h, w, C)."""
  mean: jax.Array
  logvar: jax.Array  # already clipped to LOGVAR_RANGE

  @classmethod
  def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
    """Encoder output (B, h, w, 2C): mean is the first C channels, log-variance the rest."""
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return cls(mean, jnp.clip(logvar, *LOGVAR_RANGE))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self) -> jax.Array:
    return jnp.exp(self.logvar)

  def sample(self, key: jax.Array) -> jax.Array:
    return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

  def mode(self) -> jax.Array:
    return self.mean

  def kl(self, other: "DiagonalGaussian | None" = None) -> jax.Array:
    """KL(self || other), summed over (h, w, C) -> (B,); `other` defaults to N(0, I)."""
    if other is None:
      terms = self.mean ** 2 + self.var - 1.0 - self.logvar
    else:
      terms = ((self.mean - other.mean) ** 2 / other.var + self.var / other.var - 1.0
               - self.logvar + other.logvar)
    return 0.5 * jnp.sum(terms, axis=(1, 2, 3))

  def nll(self, sample: jax.Array) -> jax.Array:
    """-log N(sample; mean, var), summed over (h, w, C) -> (B,)."""
    terms = jnp.log(2.0 * jnp.pi) + self.logvar + (sample - self.mean) ** 2 / self.var
    return 0.5 * jnp.sum(terms, axis=(1, 2, 3))


@flax.struct.dataclass
class VQOutput:
  """What the vector quantizer returns."""
  quantized: jax.Array  # (B, h, w, D) codebook vectors, straight-through gradient to z
  indices: jax.Array  # (B, h, w) int32 code of each position
  loss: jax.Array  # () codebook_loss + beta * commitment_loss (EMA codebook: beta * commitment)
  codebook_loss: jax.Array  # () mean |sg(z) - e|^2, trains the codebook
  commitment_loss: jax.Array  # () mean |z - sg(e)|^2, trains the encoder
  perplexity: jax.Array  # () exp(entropy of code frequencies in the batch)
  usage: jax.Array  # () fraction of the codebook used in the batch
  counts: jax.Array  # (K,) how many positions chose each code (no gradient)
  sums: jax.Array  # (K, D) sum of the latents that chose each code (no gradient)


CODEBOOK_UPDATES = ("loss", "ema")


class VectorQuantizer(nn.Module):
  """Nearest-codebook-vector quantisation (VQ-VAE, van den Oord et al. 2017) with the
  straight-through estimator. Codebook init uniform(-1/K, 1/K) as LDM / taming.

  The loss puts beta on the commitment term, as in the VQ-VAE paper; LDM / taming /
  diffusers' default "legacy" quantizer puts it on the codebook term instead. The
  forward value is the same, (1 + beta) * mse; only the gradients split differently.

  codebook_update="ema" (VQ-VAE paper, appendix; Razavi et al. 2019) moves the
  codebook by exponential moving averages of the assigned latents instead of the
  codebook loss: parameters `ema_cluster_size` (K,) and `ema_embed_sum` (K, D) hold
  the averages and receive no gradient; the training step applies
  `ema_codebook_update` to them and to `embedding` after every update (see
  ldm_jax/training/autoencoder.py). The loss is then beta * commitment only.
  """
  num_embeddings: int
  embed_dim: int
  beta: float = 0.25
  codebook_update: str = "loss"

  def setup(self):
    check(self.codebook_update in CODEBOOK_UPDATES, f"vector quantizer: unknown "
          f"codebook_update {self.codebook_update!r}; valid: {list(CODEBOOK_UPDATES)}")
    k = 1.0 / self.num_embeddings
    init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -k, k)
    self.embedding = self.param("embedding", partitioned(init, ("codebook", None)),
                                (self.num_embeddings, self.embed_dim), jnp.float32)
    if self.codebook_update == "ema":
      # Start the averages at "one latent equal to each initial code".
      self.ema_cluster_size = self.param(
          "ema_cluster_size", partitioned(nn.initializers.ones, ("codebook",)),
          (self.num_embeddings,), jnp.float32)
      self.ema_embed_sum = self.param(
          "ema_embed_sum", partitioned(lambda key, shape, dtype: self.embedding, ("codebook", None)),
          (self.num_embeddings, self.embed_dim), jnp.float32)

  def lookup(self, indices: jax.Array) -> jax.Array:
    """(...) int codes -> (..., D) codebook vectors."""
    return jnp.take(self.embedding, indices, axis=0)

  def __call__(self, z: jax.Array) -> VQOutput:
    check(z.shape[-1] == self.embed_dim, f"vector quantizer: latents have {z.shape[-1]} "
          f"channels, the codebook vectors {self.embed_dim}")
    z = z.astype(jnp.float32)
    flat = z.reshape(-1, self.embed_dim)  # (N, D)
    codebook = self.embedding  # (K, D)
    distances = (jnp.sum(flat ** 2, 1, keepdims=True) - 2.0 * flat @ codebook.T
                 + jnp.sum(codebook ** 2, 1)[None])  # (N, K)
    indices = jnp.argmin(distances, axis=1).astype(jnp.int32)  # (N,)
    z_q = self.lookup(indices).reshape(z.shape)
    codebook_loss = jnp.mean((jax.lax.stop_gradient(z) - z_q) ** 2)
    commitment_loss = jnp.mean((z - jax.lax.stop_gradient(z_q)) ** 2)
    # Per-code counts and latent sums without an (N, K) one-hot.
    counts = jax.ops.segment_sum(jnp.ones_like(indices, jnp.float32), indices,
                                 self.num_embeddings)
    sums = jax.ops.segment_sum(jax.lax.stop_gradient(flat), indices, self.num_embeddings)
    probs = counts / indices.shape[0]
    perplexity = jnp.exp(-jnp.sum(probs * jnp.log(probs + 1e-10)))
    if self.codebook_update == "ema":
      loss = self.beta * commitment_loss
    else:
      loss = codebook_loss + self.beta * commitment_loss
    return VQOutput(quantized=z + jax.lax.stop_gradient(z_q - z),  # straight-through
                    indices=indices.reshape(z.shape[:-1]), loss=loss,
                    codebook_loss=codebook_loss, commitment_loss=commitment_loss,
                    perplexity=perplexity, usage=jnp.mean(counts > 0), counts=counts,
                    sums=sums)


def ema_codebook_update(quantizer_params: dict, counts: jax.Array, sums: jax.Array,
                        decay: float, epsilon: float = 1e-5) -> dict:
  """One EMA codebook step (`codebook_update="ema"`): N <- d N + (1 - d) n,
  S <- d S + (1 - d) sum(z), embedding = S / N~ with N~ Laplace-smoothed
  ((N + eps) / (sum N + K eps) * sum N) so an unused code never divides by zero.
  `counts` / `sums` are the batch's (VQOutput.counts / .sums, over all devices)."""
  size = decay * quantizer_params["ema_cluster_size"] + (1.0 - decay) * counts
  embed_sum = decay * quantizer_params["ema_embed_sum"] + (1.0 - decay) * sums
  total = jnp.sum(size)
  smoothed = (size + epsilon) / (total + size.shape[0] * epsilon) * total
  return dict(quantizer_params, ema_cluster_size=size, ema_embed_sum=embed_sum,
              embedding=embed_sum / smoothed[:, None])


class _Autoencoder(nn.Module):
  """Fields and parts shared by `AutoencoderKL` and `VQModel`.

  Attributes:
    in_channels / out_channels: image channels in and out.
    block_out_channels: width of each resolution level; f = 2^(len - 1).
    layers_per_block: ResNets per encoder level (decoder: one more).
    latent_channels: channels of the latents the denoiser sees.
    norm_groups: GroupNorm groups (must divide every width).
    mid_attention: attention in the mid blocks.
    attention_levels: encoder levels (0 = full resolution) whose ResNets are each
      followed by attention; the decoder mirrors them (LDM's attn_resolutions).
    scaling_factor / shift_factor: latent normalisation, see `to_latent`.
    dtype: compute dtype; parameters and GroupNorm statistics stay float32.
    attention: attention backend, one of `ldm_jax.models.attention.BACKENDS`.
  """
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_groups: int = 32
  mid_attention: bool = True
  attention_levels: Sequence[int] = ()
  scaling_factor: float = 1.0
  shift_factor: float = 0.0
  dtype: Dtype = jnp.float32
  attention: str = "xla"

  @property
  def downsampling_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def to_latent(self, z: jax.Array) -> jax.Array:
    """Autoencoder latents -> the normalised latents a denoiser is trained on."""
    return (z - self.shift_factor) * self.scaling_factor

  def from_latent(self, z: jax.Array) -> jax.Array:
    """Inverse of `to_latent`: denoiser latents -> what `decode` takes."""
    return z / self.scaling_factor + self.shift_factor

  def _check(self):
    levels = len(self.block_out_channels)
    bad = [c for c in self.block_out_channels if c % self.norm_groups]
    check(not bad, f"autoencoder: widths {bad} of block_out_channels "
          f"{tuple(self.block_out_channels)} are not multiples of norm_groups {self.norm_groups}")
    bad = [i for i in self.attention_levels if not 0 <= i < levels]
    check(not bad, f"autoencoder: attention_levels {bad} out of range; valid: 0..{levels - 1}")
    check(self.attention in BACKENDS,
          f"autoencoder: unknown attention backend {self.attention!r}; valid: {list(BACKENDS)}")

  def _coders(self, moments_channels: int):
    self._check()
    shared = dict(block_out_channels=tuple(self.block_out_channels),
                  layers_per_block=self.layers_per_block, groups=self.norm_groups,
                  mid_attention=self.mid_attention,
                  attention_levels=tuple(self.attention_levels), dtype=self.dtype,
                  attention=self.attention)
    return (Encoder(moments_channels, **shared, name="encoder"),
            Decoder(self.out_channels, **shared, name="decoder"))

  def _check_images(self, x: jax.Array):
    """Channel count here; the size (a multiple of f) is checked by the Encoder."""
    check(x.ndim == 4 and x.shape[-1] == self.in_channels,
          f"autoencoder encode: images of shape {tuple(x.shape)}, expected (B, H, W, "
          f"{self.in_channels}) (in_channels of this autoencoder)")

  def _check_latents(self, z: jax.Array, channels: int):
    check(z.ndim == 4 and z.shape[-1] == channels,
          f"autoencoder decode: latents of shape {z.shape}, expected (B, h, w, {channels}) "
          f"(latent_channels of this autoencoder); is the denoiser's channel count the VAE's?")


class AutoencoderKL(_Autoencoder):
  """KL-regularised autoencoder (LDM's AutoencoderKL; SD / SDXL / SD3 VAEs).

  Attributes (besides `_Autoencoder`'s):
    use_quant_conv / use_post_quant_conv: 1x1 convs on the moments / latents.
  """
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True

  def setup(self):
    moments = 2 * self.latent_channels
    self.encoder, self.decoder = self._coders(moments)
    if self.use_quant_conv:
      self.quant_conv = conv(moments, 1, name="quant_conv", dtype=self.dtype)
    if self.use_post_quant_conv:
      self.post_quant_conv = conv(self.latent_channels, 1, name="post_quant_conv",
                                  dtype=self.dtype)

  def encode(self, x: jax.Array) -> DiagonalGaussian:
    """Images (B, H, W, in_channels) in [-1, 1] -> posterior over (B, H/f, W/f, C)."""
    self._check_images(x)
    moments = self.encoder(x)
    if self.use_quant_conv:
      moments = self.quant_conv(moments)
    return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

  def decode(self, z: jax.Array) -> jax.Array:
    """Latents (B, h, w, latent_channels) -> images (B, f h, f w, out_channels), float32."""
    self._check_latents(z, self.latent_channels)
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x: jax.Array, sample_posterior: bool = False,
               key: jax.Array | None = None) -> tuple[jax.Array, DiagonalGaussian]:
    """Reconstruction of `x` from the posterior's sample (needs `key`) or mode.

    Returns (reconstruction (B, H, W, out_channels), posterior).
    """
    posterior = self.encode(x)
    if sample_posterior:
      check(key is not None, "AutoencoderKL: sample_posterior=True needs a PRNG key")
      z = posterior.sample(key)
    else:
      z = posterior.mode()
    return self.decode(z), posterior


class VQModel(_Autoencoder):
  """Vector-quantised autoencoder (LDM's VQModel), quantising as diffusers' VQModel:
  `encode` gives the continuous latents after quant_conv (what LDM's denoisers see),
  `decode` quantises them (unless `force_not_quantize`) before post_quant_conv.

  Attributes (besides `_Autoencoder`'s):
    num_embeddings: codebook size K.
    embed_dim: codebook vector width D (quant_conv maps latent_channels -> D).
    beta: commitment weight.
    codebook_update: "loss" (codebook loss, as LDM) or "ema" (moving averages; see
      `VectorQuantizer`).
  """
  num_embeddings: int = 8192
  embed_dim: int = 3
  beta: float = 0.25
  codebook_update: str = "loss"

  def setup(self):
    self.encoder, self.decoder = self._coders(self.latent_channels)
    self.quant_conv = conv(self.embed_dim, 1, name="quant_conv", dtype=self.dtype)
    self.quantize = VectorQuantizer(self.num_embeddings, self.embed_dim, self.beta,
                                    self.codebook_update, name="quantize")
    self.post_quant_conv = conv(self.latent_channels, 1, name="post_quant_conv",
                                dtype=self.dtype)

  def encode(self, x: jax.Array) -> jax.Array:
    """Images (B, H, W, in) -> unquantised latents (B, H/f, W/f, embed_dim), float32."""
    self._check_images(x)
    return self.quant_conv(self.encoder(x)).astype(jnp.float32)

  def _decode_quantized(self, z_q: jax.Array) -> jax.Array:
    return self.decoder(self.post_quant_conv(z_q)).astype(jnp.float32)

  def decode(self, h: jax.Array, force_not_quantize: bool = False) -> jax.Array:
    """Latents (B, h, w, embed_dim) -> images; quantised first unless told not to."""
    self._check_latents(h, self.embed_dim)
    z_q = h if force_not_quantize else self.quantize(h).quantized
    return self._decode_quantized(z_q)

  def decode_indices(self, indices: jax.Array) -> jax.Array:
    """Codes (B, h, w) -> images."""
    return self._decode_quantized(self.quantize.lookup(indices))

  def __call__(self, x: jax.Array) -> tuple[jax.Array, VQOutput]:
    """Returns (reconstruction (B, H, W, out_channels), quantizer output)."""
    vq = self.quantize(self.encode(x))
    return self._decode_quantized(vq.quantized), vq


MODEL_CLASSES = {"kl": AutoencoderKL, "vq": VQModel}


def inference_weights(params, config: dict) -> tuple[dict, dict]:
  """(params, config) without training-only state: an EMA codebook's moving averages
  (`ema_cluster_size`, `ema_embed_sum`) are dropped and `codebook_update` removed, so
  the result is the plain VQModel every exporter and reader knows. Anything else is
  returned unchanged."""
  config = dict(config)
  if config.pop("codebook_update", "loss") != "ema":
    return params, config
  params = dict(params)
  params["quantize"] = {k: v for k, v in params["quantize"].items()
                        if k not in ("ema_cluster_size", "ema_embed_sum")}
  return params, config


def make(config: dict) -> AutoencoderKL | VQModel:
  """The module for a config dict of its fields plus `kind` ("kl" or "vq"), as the
  converters in `ldm_jax.convert.vae` return."""
  config = dict(config)
  kind = config.pop("kind", None)
  check(kind in MODEL_CLASSES, f"autoencoder config: kind {kind!r}; valid: {sorted(MODEL_CLASSES)}")
  cls = MODEL_CLASSES[kind]
  fields = set(cls.__dataclass_fields__) - {"parent", "name"}
  unknown = sorted(set(config) - fields)
  check(not unknown, f"{cls.__name__} config has unknown fields {unknown}; valid: {sorted(fields)}")
  if "dtype" in config:
    config["dtype"] = compute_dtype(config["dtype"])
  for key in ("block_out_channels", "attention_levels"):
    if key in config:
      config[key] = tuple(config[key])
  return cls(**config)


def build(model_config, **overrides) -> AutoencoderKL | VQModel:
  """An autoencoder from `config.model` (`variant` from VARIANTS plus field overrides)."""
  check(model_config.variant in VARIANTS, f"unknown {model_config.name} variant "
        f"{model_config.variant!r}; valid: {sorted(VARIANTS)}")
  cls = MODEL_CLASSES[VARIANTS[model_config.variant]["kind"]]
  rows = {name: {k: v for k, v in row.items() if k != "kind"} for name, row in VARIANTS.items()}
  return cls(**variant_kwargs(cls, rows, model_config, overrides))
