"""DiT: Scalable Diffusion Models with Transformers (Peebles & Xie, 2023).

Patchified (latent) images -> transformer blocks with adaLN-Zero conditioning on
timestep + class -> final adaLN layer -> unpatchify. Names mirror the official
PyTorch `models.py` (x_embedder, t_embedder, y_embedder, blocks, final_layer) so the
converters in `ldm_jax/convert/dit.py` are near-identity. Images are NHWC.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.errors import check
from ldm_jax.models.attention import BACKENDS
from ldm_jax.models.registry import variant_kwargs
from ldm_jax.models.embeddings import ClassEmbedder, TimestepEmbedder, sincos_2d
from ldm_jax.models.layers import (Attention, Dtype, Mlp, compute_dtype, conv, layer_norm,
                                   modulate, nn_xavier_flat, zero_dense)

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
    # On 7x7 latents of the MNIST f4 autoencoders (configs/ldm_mnist.py): 49 tokens.
    "DiT-mnist-latent/1": dict(depth=6, hidden_size=192, num_heads=6, patch_size=1),
})
# Activation rematerialisation of each block: "none", "full" (recompute everything)
# or a `jax.checkpoint_policies` name (what the backward pass may keep).
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "nothing_saveable", "everything_saveable")


class DiTBlock(nn.Module):
  """Transformer block with adaLN-Zero: six modulation vectors from the condition."""
  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  mlp_norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  qk_norm: bool = False
  attention: str = "xla"

  @nn.compact
  def __call__(self, x_btd: jax.Array, c_bd: jax.Array) -> jax.Array:
    mod = zero_dense(6 * self.hidden_size, ("embed", "mlp"), name="adaLN_modulation",
                     dtype=self.dtype)(nn.silu(c_bd))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, -1)
    h = modulate(layer_norm(name="norm1", affine=False)(x_btd), shift_msa, scale_msa)
    attn = Attention(self.num_heads, dtype=self.dtype, qk_norm=self.qk_norm,
                     backend=self.attention, name="attn")
    x_btd = x_btd + gate_msa[:, None] * attn(h.astype(self.dtype))
    h = modulate(layer_norm(name="norm2", affine=False, epsilon=self.mlp_norm_eps)(x_btd),
                 shift_mlp, scale_mlp)
    x_btd = x_btd + gate_mlp[:, None] * Mlp(int(self.hidden_size * self.mlp_ratio),
                                            dtype=self.dtype, name="mlp")(h.astype(self.dtype))
    return nn.with_logical_constraint(x_btd, ("batch", "tokens", "act_embed"))


class DiTScanStep(DiTBlock):
  """`DiTBlock` as an `nn.scan` step: (x, c) -> (x, None), c broadcast to every layer."""

  def __call__(self, x_btd: jax.Array, c_bd: jax.Array):  # pylint: disable=arguments-differ
    return super().__call__(x_btd, c_bd), None


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
    dtype: compute dtype, float32 or bfloat16 (`build` takes the names in
      `layers.DTYPES`). Parameters, LayerNorm / RMSNorm statistics, the softmax and
      the output stay float32; the residual stream runs in the compute dtype.
    qk_norm: RMSNorm of q and k per head (not in the official / diffusers DiT).
    remat: activation rematerialisation of each block, one of REMAT_POLICIES.
    scan_layers: run the blocks as one `nn.scan` over stacked parameters (params
      under "blocks" with a leading "layers" axis; see `stack_blocks`).
    attention: attention backend, one of `ldm_jax.models.attention.BACKENDS`.
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
  qk_norm: bool = False
  remat: str = "none"
  scan_layers: bool = False
  attention: str = "xla"

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
    x = self._blocks(x, c)
    x = FinalLayer(self.hidden_size, p, self.out_channels, dtype=self.dtype,
                   name="final_layer")(x, c)  # (B, T, p*p*C)
    x = x.reshape(batch, grid_h, grid_w, p, p, self.out_channels)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height, width, self.out_channels)
    return x.astype(jnp.float32)

  def _blocks(self, x_btd: jax.Array, c_bd: jax.Array) -> jax.Array:
    """The `depth` transformer blocks: unrolled (`blocks_{i}`) or scanned (`blocks`)."""
    check(self.remat in REMAT_POLICIES,
          f"DiT: unknown remat policy {self.remat!r}; valid: {list(REMAT_POLICIES)}")
    check(self.attention in BACKENDS,
          f"DiT: unknown attention backend {self.attention!r}; valid: {list(BACKENDS)}")
    block_class = DiTScanStep if self.scan_layers else DiTBlock
    if self.remat != "none":
      policy = None if self.remat == "full" else getattr(jax.checkpoint_policies, self.remat)
      # Inside a scan, CSE across iterations is impossible anyway; prevent_cse would
      # only block optimisations (the Flax / JAX recommendation).
      block_class = nn.remat(block_class, policy=policy, prevent_cse=not self.scan_layers)
    block_args = dict(hidden_size=self.hidden_size, num_heads=self.num_heads,
                      mlp_ratio=self.mlp_ratio, mlp_norm_eps=self.mlp_norm_eps,
                      dtype=self.dtype, qk_norm=self.qk_norm, attention=self.attention)
    if not self.scan_layers:
      for i in range(self.depth):
        x_btd = block_class(**block_args, name=f"blocks_{i}")(x_btd, c_bd)
      return x_btd
    scanned = nn.scan(block_class, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=nn.broadcast, length=self.depth,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    x_btd, _ = scanned(**block_args, name="blocks")(x_btd, c_bd)
    return x_btd


def stack_blocks(params, depth: int):
  """Per-block params (`blocks_0` ... `blocks_{depth-1}`) -> a `scan_layers=True`
  tree: one `blocks` entry whose leaves gain a leading layer axis.

  Args:
    params: the DiT params dict (unboxed; numpy or jax leaves).
    depth: number of blocks.
  Returns:
    A new dict; numpy leaves stay numpy.
  """
  params = dict(params)
  names = [f"blocks_{i}" for i in range(depth)]
  missing = [n for n in names if n not in params]
  check(not missing, f"stack_blocks: params lack {missing} (have {sorted(params)}); "
        f"are they already stacked, or is depth {depth} wrong?")
  extra = sorted(k for k in params if k.startswith("blocks_") and k not in names)
  check(not extra, f"stack_blocks: params have {extra} beyond depth {depth}")
  blocks = [params.pop(n) for n in names]
  stack = lambda *xs: (np.stack(xs) if all(isinstance(x, np.ndarray) for x in xs)
                       else jnp.stack(xs))
  params["blocks"] = jax.tree.map(stack, *blocks)
  return params


def unstack_blocks(params):
  """Inverse of `stack_blocks`: a scanned tree -> per-block `blocks_{i}` entries."""
  params = dict(params)
  check("blocks" in params, f"unstack_blocks: params have no stacked 'blocks' entry "
        f"(have {sorted(params)}); are they already per-block?")
  stacked = params.pop("blocks")
  depth = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(depth):
    params[f"blocks_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params


def build(model_config, **overrides) -> DiT:
  """A `DiT` from `config.model` (`variant` from VARIANTS plus field overrides)."""
  kwargs = variant_kwargs(DiT, VARIANTS, model_config, overrides)
  size, patch = kwargs.get("input_size", 32), kwargs["patch_size"]
  check(size % patch == 0,
        f"DiT: image size {size} is not divisible by patch size {patch} "
        f"(variant {model_config.variant!r}); use a multiple of {patch}, e.g. "
        f"{size - size % patch or patch}, or another patch size")
  kwargs["dtype"] = compute_dtype(kwargs.get("dtype", jnp.float32))
  return DiT(**kwargs)
