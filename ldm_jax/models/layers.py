"""Small building blocks shared by the models: layers whose parameters carry
logical axis names (see ARCHITECTURE.md, "Sharding is data, not code").

Logical axis names used across ldm_jax:
  embed      model width (DiT hidden size)
  mlp        hidden width of a feed-forward layer
  heads, kv  attention heads and per-head width
  conv_in, conv_out   input / output channels of a convolution
  classes    rows of a class-embedding table
  norm       scale / bias of a normalisation layer
Spatial kernel axes and the q/k/v split are left unnamed (never sharded).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def partitioned(init, axes: Sequence[str | None]):
  """An initializer whose parameter carries the logical axis names `axes`."""
  return nn.with_logical_partitioning(init, tuple(axes))


def dense(features: int, axes: tuple[str | None, str | None], *, name: str,
          kernel_init=nn.initializers.xavier_uniform(), use_bias: bool = True,
          dtype: Dtype = jnp.float32) -> nn.Dense:
  """A `Dense` layer with logical axes (in, out) on its kernel and (out,) on its bias."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name,
                  kernel_init=partitioned(kernel_init, axes),
                  bias_init=partitioned(nn.initializers.zeros, (axes[1],)))


def zero_dense(features: int, axes, *, name: str, dtype: Dtype = jnp.float32) -> nn.Dense:
  """A `Dense` layer initialised to exactly zero (adaLN-Zero, final layers)."""
  return dense(features, axes, name=name, kernel_init=nn.initializers.zeros, dtype=dtype)


def conv(features: int, kernel: int, *, name: str, strides: int = 1, padding="SAME",
         kernel_init=nn.initializers.lecun_normal(), dtype: Dtype = jnp.float32) -> nn.Conv:
  """A 2-D NHWC convolution with logical axes on kernel (h, w, in, out) and bias."""
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=padding,
                 dtype=dtype, name=name,
                 kernel_init=partitioned(kernel_init, (None, None, "conv_in", "conv_out")),
                 bias_init=partitioned(nn.initializers.zeros, ("conv_out",)))


def layer_norm(*, name: str, affine: bool = True, epsilon: float = 1e-6) -> nn.LayerNorm:
  """LayerNorm computed in float32 statistics; affine parameters on the `norm` axis."""
  return nn.LayerNorm(epsilon=epsilon, use_bias=affine, use_scale=affine, name=name,
                      dtype=jnp.float32,
                      scale_init=partitioned(nn.initializers.ones, ("norm",)),
                      bias_init=partitioned(nn.initializers.zeros, ("norm",)))


def group_norm(groups: int, *, name: str, epsilon: float = 1e-5) -> nn.GroupNorm:
  """GroupNorm with float32 statistics; affine parameters on the `norm` axis."""
  return nn.GroupNorm(num_groups=groups, epsilon=epsilon, name=name, dtype=jnp.float32,
                      scale_init=partitioned(nn.initializers.ones, ("norm",)),
                      bias_init=partitioned(nn.initializers.zeros, ("norm",)))


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """adaLN modulation: x * (1 + scale) + shift, broadcast over tokens."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


class Attention(nn.Module):
  """Multi-head self-attention with a fused q/k/v projection.

  Kernel layout (embed, 3, heads, kv) so heads shard cleanly under tensor
  parallelism; softmax runs in float32 whatever the compute dtype.
  """
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_btd: jax.Array) -> jax.Array:
    width = x_btd.shape[-1]
    head_dim = width // self.num_heads
    qkv = nn.DenseGeneral(
        (3, self.num_heads, head_dim), dtype=self.dtype, name="qkv",
        kernel_init=partitioned(
            nn.initializers.xavier_uniform(),
            ("embed", None, "heads", "kv")),
        bias_init=partitioned(nn.initializers.zeros, (None, "heads", "kv")))(x_btd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, T, H, Dh) each
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(head_dim)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)  # (B, T, H, Dh)
    return nn.DenseGeneral(
        width, axis=(-2, -1), dtype=self.dtype, name="proj",
        kernel_init=partitioned(
            nn.initializers.xavier_uniform(),
            ("heads", "kv", "embed")),
        bias_init=partitioned(nn.initializers.zeros, ("embed",)))(out)


class Mlp(nn.Module):
  """Two-layer feed-forward block with tanh-approximated GELU (as DiT / ViT)."""
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    x = dense(self.hidden, ("embed", "mlp"), name="fc1", dtype=self.dtype)(x)
    x = nn.gelu(x, approximate=True)
    return dense(width, ("mlp", "embed"), name="fc2", dtype=self.dtype)(x)


def nn_xavier_flat():
  """Xavier-uniform over a conv kernel viewed as a matrix (h*w*in, out), as DiT
  initialises its patch embedding."""
  return nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3)
