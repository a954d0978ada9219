"""Small building blocks shared by the models: layers whose parameters carry
logical axis names (see ARCHITECTURE.md, "Sharding is data, not code").

Logical axis names used across ldm_jax:
  embed      model width (DiT hidden size)
  mlp        hidden width of a feed-forward layer
  heads, kv  attention heads and per-head width
  conv_in, conv_out   input / output channels of a convolution
  classes    rows of a class-embedding table
  norm       scale / bias of a normalisation layer (q/k RMSNorm scales: kv)
  layers     leading axis of blocks stacked for nn.scan (DiT scan_layers)
  vocab      rows of a token-embedding table (text encoders)
Spatial kernel axes and the q/k/v split are left unnamed (never sharded).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.errors import check
from ldm_jax.models.attention import dot_product_attention

Dtype = Any
# Compute dtypes by config name (`config.model.dtype`); parameters stay float32.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(dtype) -> Dtype:
  """The jnp dtype for a config name in DTYPES (a dtype among them passes through).

  Raises:
    UserError naming the bad value and the valid names.
  """
  if isinstance(dtype, str):
    check(dtype in DTYPES, f"unknown dtype {dtype!r}; valid: {sorted(DTYPES)}")
    return DTYPES[dtype]
  valid = {jnp.dtype(d) for d in DTYPES.values()}
  check(jnp.dtype(dtype) in valid, f"unsupported dtype {dtype}; valid: {sorted(DTYPES)}")
  return dtype


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


def rms_norm(*, name: str, epsilon: float = 1e-6) -> nn.RMSNorm:
  """RMSNorm over the last (head) axis in float32, learned scale on the `kv` axis."""
  return nn.RMSNorm(epsilon=epsilon, dtype=jnp.float32, name=name,
                    scale_init=partitioned(nn.initializers.ones, ("kv",)))


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """adaLN modulation: x * (1 + scale) + shift, broadcast over tokens."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


class Attention(nn.Module):
  """Multi-head self-attention with a fused q/k/v projection.

  Kernel layout (embed, 3, heads, kv) so heads shard cleanly under tensor
  parallelism; softmax runs in float32 whatever the compute dtype.

  Attributes:
    num_heads: number of heads (must divide the width).
    dtype: compute dtype; parameters stay float32.
    qk_norm: RMS-normalise q and k over the head dim (learned scale per channel,
      float32 statistics) before the dot product, as SD3 / FLUX do.
    backend: attention backend, see `ldm_jax.models.attention.BACKENDS`.
    interpret: run a Pallas backend in Pallas' interpreter (tests on CPU).
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  qk_norm: bool = False
  backend: str = "xla"
  interpret: bool = False

  @nn.compact
  def __call__(self, x_btd: jax.Array) -> jax.Array:
    width = x_btd.shape[-1]
    head_dim = width // self.num_heads
    qkv = DenseGeneral((3, self.num_heads, head_dim), in_dims=1,
                       kernel_axes=("embed", None, "heads", "kv"),
                       bias_axes=(None, "heads", "kv"), dtype=self.dtype, name="qkv")(x_btd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, T, H, Dh) each
    if self.qk_norm:
      q = rms_norm(name="q_norm")(q).astype(self.dtype)
      k = rms_norm(name="k_norm")(k).astype(self.dtype)
    out = dot_product_attention(q, k, v, backend=self.backend,
                                interpret=self.interpret)  # (B, T, H, Dh)
    return DenseGeneral((width,), in_dims=2, kernel_axes=("heads", "kv", "embed"),
                        bias_axes=("embed",), dtype=self.dtype, name="proj")(out)


class DenseGeneral(nn.Module):
  """x contracted over its last `in_dims` axes with a kernel (in..., out...) born in
  that full shape, Xavier-uniform over fan-in = prod(in), fan-out = prod(out); bias
  (out...). Values equal Flax's `nn.DenseGeneral`'s for the same key, but Flax
  initialises a flattened 2-D kernel, so under `nn.logical_axis_rules` its parameter
  shape check (which re-runs the initializer) applies the 4-D logical names to a 2-D
  array and fails; born in full shape, the names always fit."""
  features: tuple
  in_dims: int
  kernel_axes: tuple
  bias_axes: tuple
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_shape, out_shape = tuple(x.shape[x.ndim - self.in_dims:]), tuple(self.features)
    n_in, n_out = len(in_shape), len(out_shape)
    init = nn.initializers.xavier_uniform(in_axis=tuple(range(n_in)),
                                          out_axis=tuple(range(n_in, n_in + n_out)))
    kernel = self.param("kernel", partitioned(init, self.kernel_axes), in_shape + out_shape,
                        jnp.float32)
    bias = self.param("bias", partitioned(nn.initializers.zeros, self.bias_axes), out_shape,
                      jnp.float32)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
    return y + bias.astype(self.dtype)


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
