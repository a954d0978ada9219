"""Embeddings of time, class labels and position shared by the denoisers."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models.layers import dense, partitioned, Dtype


def timestep_features(t: jax.Array, dim: int, max_period: float = 10000.0,
                      freq_shift: float = 0.0) -> jax.Array:
  """Sinusoidal features of (possibly fractional) timesteps, [cos | sin] order.

  Args:
    t: (B,) timesteps.
    dim: output width (even).
    max_period: lowest frequency's period.
    freq_shift: 0 follows the official DiT (`/ half`); 1 follows diffusers'
      `Timesteps(downscale_freq_shift=1)` (`/ (half - 1)`), which its
      `DiTTransformer2DModel` uses. The two differ numerically.
  Returns:
    (B, dim) float32 features.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
                  / (half - freq_shift))
  args = t.astype(jnp.float32)[:, None] * freqs[None]  # (B, half)
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedder(nn.Module):
  """Sinusoidal features -> Dense -> SiLU -> Dense (DiT's `t_embedder`)."""
  hidden_size: int
  frequency_size: int = 256
  freq_shift: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    init = nn.initializers.normal(0.02)
    x = timestep_features(t, self.frequency_size, freq_shift=self.freq_shift)
    x = dense(self.hidden_size, (None, "mlp"), name="mlp_0", kernel_init=init,
              dtype=self.dtype)(x)
    x = nn.silu(x)
    return dense(self.hidden_size, ("mlp", "embed"), name="mlp_2", kernel_init=init,
                 dtype=self.dtype)(x)


class ClassEmbedder(nn.Module):
  """Class-label table with one extra "null" row (index `num_classes`) for
  classifier-free guidance; in training, labels are replaced by the null class
  with probability `dropout_prob` (rng stream "label_dropout")."""
  num_classes: int
  hidden_size: int
  dropout_prob: float = 0.1

  @property
  def null_class(self) -> int:
    return self.num_classes

  @nn.compact
  def __call__(self, labels: jax.Array, train: bool = False) -> jax.Array:
    table = self.param(
        "embedding_table",
        partitioned(nn.initializers.normal(0.02), ("classes", "embed")),
        (self.num_classes + int(self.dropout_prob > 0), self.hidden_size))
    if train and self.dropout_prob > 0:
      drop = jax.random.bernoulli(self.make_rng("label_dropout"), self.dropout_prob,
                                  labels.shape)
      labels = jnp.where(drop, self.null_class, labels)
    return jnp.take(table, labels, axis=0)


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  """(N, dim) sin|cos features of positions, float64 (MAE / DiT convention)."""
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int | None = None,
              base_size: int | None = None) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding, (grid_h * grid_w, dim), row-major tokens.

  Half the channels encode the column, half the row (official DiT layout).
  `base_size` rescales coordinates as diffusers' PatchEmbed does (grid / (grid / base)).
  """
  grid_w = grid_h if grid_w is None else grid_w
  scale_h = 1.0 if base_size is None else grid_h / base_size
  scale_w = 1.0 if base_size is None else grid_w / base_size
  rows = np.arange(grid_h, dtype=np.float64) / scale_h
  cols = np.arange(grid_w, dtype=np.float64) / scale_w
  col_grid, row_grid = np.meshgrid(cols, rows)  # each (grid_h, grid_w)
  return np.concatenate([sincos_1d(dim // 2, col_grid), sincos_1d(dim // 2, row_grid)],
                        axis=1).astype(np.float32)
