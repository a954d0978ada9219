"""DiT: Scalable Diffusion Models with Transformers (Peebles & Xie, 2023).

Patchified (latent) images -> transformer blocks with adaLN-Zero conditioning on
timestep + class -> final adaLN layer -> unpatchify. Names mirror the official
PyTorch `models.py` (x_embedder, t_embedder, y_embedder, blocks, final_layer) so the
converters in `ldm_jax/convert/dit.py` are near-identity. Images are NHWC.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.errors import check
from ldm_jax.models.registry import variant_kwargs
from ldm_jax.models.embeddings import ClassEmbedder, TimestepEmbedder, sincos_2d
from ldm_jax.models.layers import (Attention, Dtype, Mlp, conv, layer_norm, modulate,
                                   nn_xavier_flat, zero_dense)

# The paper's twelve variants: (depth, hidden size, heads) x patch size.
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
VARIANTS = {
    f"DiT-{size}/{patch}": dict(depth=d, hidden_size=w, num_heads=h, patch_size=patch)
    for size, (d, w, h) in _SIZES.items() for patch in (2, 4, 8)
}
# Tiny ones for tests and CPU demos.
VARIANTS.update({
    "DiT-tiny/2": dict(depth=2, hidden_size=64, num_heads=4, patch_size=2),
    "DiT-mnist/4": dict(depth=6, hidden_size=192, num_heads=6, patch_size=4),
})


class DiTBlock(nn.Module):
  """Transformer block with adaLN-Zero: six modulation vectors from the condition."""
  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  mlp_norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_btd: jax.Array, c_bd: jax.Array) -> jax.Array:
    mod = zero_dense(6 * self.hidden_size, ("embed", "mlp"), name="adaLN_modulation",
                     dtype=self.dtype)(nn.silu(c_bd))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, -1)
    h = modulate(layer_norm(name="norm1", affine=False)(x_btd), shift_msa, scale_msa)
    x_btd = x_btd + gate_msa[:, None] * Attention(self.num_heads, dtype=self.dtype,
                                                  name="attn")(h.astype(self.dtype))
    h = modulate(layer_norm(name="norm2", affine=False, epsilon=self.mlp_norm_eps)(x_btd),
                 shift_mlp, scale_mlp)
    x_btd = x_btd + gate_mlp[:, None] * Mlp(int(self.hidden_size * self.mlp_ratio),
                                            dtype=self.dtype, name="mlp")(h.astype(self.dtype))
    return nn.with_logical_constraint(x_btd, ("batch", "tokens", "embed"))


class FinalLayer(nn.Module):
  """adaLN (shift, scale) -> LayerNorm -> linear to patch pixels; zero-initialised."""
  hidden_size: int
  patch_size: int
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_btd: jax.Array, c_bd: jax.Array) -> jax.Array:
    shift, scale = jnp.split(zero_dense(2 * self.hidden_size, ("embed", "mlp"),
                                        name="adaLN_modulation", dtype=self.dtype)(nn.silu(c_bd)),
                             2, -1)
    x_btd = modulate(layer_norm(name="norm_final", affine=False)(x_btd), shift, scale)
    return zero_dense(self.patch_size ** 2 * self.out_channels, ("embed", None),
                      name="linear", dtype=self.dtype)(x_btd)


class DiT(nn.Module):
  """Class-conditional diffusion transformer.

  Attributes:
    input_size: spatial size of the (square) input.
    in_channels: input channels (4 for SD latents, 1 for MNIST pixels).
    learn_sigma: if True the output has 2 * in_channels channels (ε | variance).
    time_freq_shift: 0 = official DiT timestep features, 1 = diffusers' DiT.
    mlp_norm_eps: epsilon of the LayerNorm before the MLP (official 1e-6; diffusers'
      `norm_eps`, 1e-5 by default).
  """
  input_size: int = 32
  patch_size: int = 2
  in_channels: int = 4
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  class_dropout_prob: float = 0.1
  learn_sigma: bool = True
  time_freq_shift: float = 0.0
  mlp_norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @property
  def out_channels(self) -> int:
    return self.in_channels * 2 if self.learn_sigma else self.in_channels

  @property
  def null_class(self) -> int:
    return self.num_classes

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, train: bool = False):
    """x: (B, H, W, C) noisy input; t: (B,) timesteps; y: (B,) int labels.

    Returns (B, H, W, out_channels).
    """
    batch, height, width, _ = x.shape
    p = self.patch_size
    check(height % p == 0 and width % p == 0,
          f"DiT: image size {height}x{width} is not divisible by patch size {p}; "
          f"use an image size that is a multiple of {p}.")
    check(self.hidden_size % self.num_heads == 0,
          f"DiT: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}.")
    grid_h, grid_w = height // p, width // p
    x = conv(self.hidden_size, p, strides=p, padding="VALID", name="x_embedder",
             kernel_init=nn_xavier_flat(), dtype=self.dtype)(x.astype(self.dtype))
    x = x.reshape(batch, grid_h * grid_w, self.hidden_size)  # (B, T, D)
    x = x + jnp.asarray(sincos_2d(self.hidden_size, grid_h, grid_w), self.dtype)[None]
    t_emb = TimestepEmbedder(self.hidden_size, freq_shift=self.time_freq_shift,
                             dtype=self.dtype, name="t_embedder")(t)
    y_emb = ClassEmbedder(self.num_classes, self.hidden_size, self.class_dropout_prob,
                          name="y_embedder")(y, train)
    c = t_emb + y_emb  # (B, D)
    for i in range(self.depth):
      x = DiTBlock(self.hidden_size, self.num_heads, self.mlp_ratio, self.mlp_norm_eps,
                   dtype=self.dtype, name=f"blocks_{i}")(x, c)
    x = FinalLayer(self.hidden_size, p, self.out_channels, dtype=self.dtype,
                   name="final_layer")(x, c)  # (B, T, p*p*C)
    x = x.reshape(batch, grid_h, grid_w, p, p, self.out_channels)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height, width, self.out_channels)
    return x.astype(jnp.float32)


def build(model_config, **overrides) -> DiT:
  """A `DiT` from `config.model` (`variant` from VARIANTS plus field overrides)."""
  kwargs = variant_kwargs(DiT, VARIANTS, model_config, overrides)
  size, patch = kwargs.get("input_size", 32), kwargs["patch_size"]
  check(size % patch == 0,
        f"DiT: image size {size} is not divisible by patch size {patch} "
        f"(variant {model_config.variant!r}); use a multiple of {patch}, e.g. "
        f"{size - size % patch or patch}, or another patch size")
  return DiT(**kwargs)
