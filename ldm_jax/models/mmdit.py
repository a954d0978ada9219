"""MM-DiT: the multimodal diffusion transformer of Stable Diffusion 3 / 3.5
(Esser et al., 2024, "Scaling Rectified Flow Transformers for High-Resolution Image
Synthesis"), numerically equal to diffusers' `SD3Transformer2DModel`.

Two token streams, patchified latents ("x") and text ("context"), each with its own
weights (adaLN-Zero modulation, q/k/v and output projections, q/k norms, MLP), meet in
one joint attention over their concatenation [x tokens | context tokens]. The
condition vector is timestep embedding + pooled-text embedding. The last block's
context stream is "pre-only": it only feeds keys / values / queries to the joint
attention (no output projection, no MLP). SD3.5's "MMDiT-X" blocks
(`dual_attention_layers`) add a second, x-only self-attention whose input is the same
LayerNorm of x modulated by its own (shift, scale), gated by its own gate.

Images are NHWC. Position embedding: a fixed 2-D sin-cos grid of
`pos_embed_max_size`² patches whose coordinates are scaled to the base grid
(input_size / patch_size), centre-cropped to the input's patch grid (diffusers'
`PatchEmbed` semantics); without `pos_embed_max_size` the grid is computed for the
input's own size, coordinates scaled to the base grid.

Parameter names (converter table in `ldm_jax/convert/mmdit.py`):
  x_embedder          patch conv (p x p, stride p)
  t_embedder          timestep features -> mlp_0 -> SiLU -> mlp_2
  pooled_embedder     pooled text -> mlp_0 -> SiLU -> mlp_2
  context_embedder    Linear(context_dim, hidden)
  blocks_{i}/x_adaLN_modulation        (hidden, 6 or 9 x hidden)
  blocks_{i}/context_adaLN_modulation  (hidden, 6 x hidden; 2 x hidden when pre-only)
  blocks_{i}/attn/{qkv, proj, q_norm, k_norm, context_qkv, context_proj,
                   context_q_norm, context_k_norm}
  blocks_{i}/attn2/{qkv, proj, q_norm, k_norm}       (dual-attention blocks)
  blocks_{i}/mlp, blocks_{i}/context_mlp             (fc1, fc2)
  final_layer/{adaLN_modulation, linear}

Modulation vectors are laid out as diffusers chunks them: blocks (shift, scale, gate)
for attention, then for the MLP, then (dual blocks) for attn2; the final layer and the
pre-only context norm use (scale, shift), in that order.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.errors import check
from ldm_jax.models.attention import BACKENDS, dot_product_attention
from ldm_jax.models.dit import REMAT_POLICIES
from ldm_jax.models.embeddings import TimestepEmbedder, sincos_1d
from ldm_jax.models.layers import (DenseGeneral, Dtype, Mlp, compute_dtype, conv, dense,
                                   layer_norm, modulate, nn_xavier_flat, partitioned,
                                   rms_norm, zero_dense)
from ldm_jax.models.registry import variant_kwargs

# Per-head q/k normalisations of diffusers' `Attention` that an SD3 joint block can
# take (the "across heads" and "l2" ones fail in diffusers' joint block).
QK_NORMS = ("rms_norm", "layer_norm", "fp32_layer_norm")
NORM_EPS = 1e-6  # every LayerNorm / RMSNorm of the SD3 transformer

# Released configs: the transformer/config.json files of the Hugging Face repos
# stabilityai/stable-diffusion-3-medium-diffusers, stabilityai/stable-diffusion-3.5-medium
# and stabilityai/stable-diffusion-3.5-large (all: head_dim 64, patch 2, 16 latent
# channels in and out, sample_size 128, joint_attention_dim 4096, pooled 2048).
_SD3 = dict(input_size=128, patch_size=2, in_channels=16, out_channels=16, head_dim=64,
            context_dim=4096, pooled_dim=2048)
VARIANTS = {
    "sd3-medium": dict(_SD3, depth=24, num_heads=24, caption_projection_dim=1536,
                       pos_embed_max_size=192),
    "sd3.5-medium": dict(_SD3, depth=24, num_heads=24, caption_projection_dim=1536,
                         pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                         qk_norm="rms_norm"),
    "sd3.5-large": dict(_SD3, depth=38, num_heads=38, caption_projection_dim=2432,
                        pos_embed_max_size=192, qk_norm="rms_norm"),
}
# The SD3 paper's model family "depth d": hidden 64 * d, d heads of 64, d blocks. We
# assume SD3's text conditioning (context 4096: CLIP-L/G penultimate features
# concatenated and zero-padded to T5-XXL's 4096; pooled 2048 = CLIP-L 768 + CLIP-G
# 1280) and SD3's position grid (base 128 latents, crop from 192 patches). No q/k norm
# (the paper adds RMS q/k norm for its high-resolution runs: override qk_norm).
VARIANTS.update({
    f"MMDiT-d{d}": dict(_SD3, depth=d, num_heads=d, pos_embed_max_size=192)
    for d in (15, 18, 21, 24, 30, 38)
})
# Tiny ones for tests and CPU demos.
_TINY = dict(input_size=8, patch_size=2, in_channels=4, depth=2, num_heads=2, head_dim=16,
             context_dim=32, pooled_dim=32, pos_embed_max_size=16)
VARIANTS.update({
    "tiny": _TINY,
    "tiny-x": dict(_TINY, qk_norm="rms_norm", dual_attention_layers=(0,)),
    # The captioned shapes on pixels (configs/mmdit_256.py:shapes_pixels): 64x64 RGB in
    # 8x8 patches (64 image tokens). The width (256) must exceed a patch's 192 values: a
    # narrower final layer cannot express the noise part of the velocity (rank-limited;
    # measured: width 128 leaves visible noise). Context / pooled widths come from the
    # text encoder.
    "shapes": dict(input_size=64, patch_size=8, in_channels=3, depth=4, num_heads=8,
                   head_dim=32, context_dim=128, pooled_dim=128, pos_embed_max_size=16,
                   qk_norm="rms_norm"),
    # The same transformer on the 16x16x4 latents of the shapes-kl-f4 autoencoder
    # (configs/mmdit_256.py:shapes, the LDM chain): 4x4 latent patches (16 image
    # tokens of 64 values, each 16x16 pixels); 2.7x the steps per second of 2x2 patches
    # (64 tokens) for the CPU budget.
    "shapes-latent": dict(input_size=16, patch_size=4, in_channels=4, depth=4, num_heads=8,
                          head_dim=32, context_dim=128, pooled_dim=128, pos_embed_max_size=8,
                          qk_norm="rms_norm"),
})


def qk_norm_type(qk_norm) -> str | None:
  """The q/k norm name of a `qk_norm` field value: False / None -> None, True ->
  "rms_norm", a name in QK_NORMS -> itself.

  Raises:
    UserError for anything else.
  """
  if qk_norm is None or qk_norm is False:
    return None
  if qk_norm is True:
    return "rms_norm"
  check(isinstance(qk_norm, str) and qk_norm in QK_NORMS,
        f"MMDiT: unknown qk_norm {qk_norm!r}; valid: False / None (none), True "
        f"(= 'rms_norm'), or one of {list(QK_NORMS)}")
  return qk_norm


def sd3_pos_embed(dim: int, grid_h: int, grid_w: int, base_size: int,
                  max_size: int | None = None) -> np.ndarray:
  """The fixed sin-cos position embedding of a grid_h x grid_w patch grid,
  (grid_h * grid_w, dim) float32, row-major tokens; the first half of the channels
  encodes the column, the second the row (as DiT's `sincos_2d`).

  With `max_size`, it is the centre crop of the max_size x max_size grid whose
  coordinates are scaled by base_size / max_size; without, the grid's own
  coordinates are scaled by base_size / grid size (diffusers' `PatchEmbed`, whose
  interpolation scale SD3 leaves at 1). Coordinates are rounded to float32 before the
  float64 sin / cos, as diffusers computes them.
  """
  def coords(n: int) -> np.ndarray:
    if max_size is None:
      return np.arange(n, dtype=np.float32) / np.float32(n / base_size)
    start = (max_size - n) // 2
    scale = np.float32(max_size / base_size)
    return np.arange(max_size, dtype=np.float32)[start:start + n] / scale

  half = dim // 2
  cols = sincos_1d(half, coords(grid_w).astype(np.float64)).astype(np.float32)  # (W, D/2)
  rows = sincos_1d(half, coords(grid_h).astype(np.float64)).astype(np.float32)  # (H, D/2)
  grid = np.concatenate([np.broadcast_to(cols[None], (grid_h, grid_w, half)),
                         np.broadcast_to(rows[:, None], (grid_h, grid_w, half))], axis=-1)
  return grid.reshape(grid_h * grid_w, dim)


def head_norm(kind: str, *, name: str) -> nn.Module:
  """Per-head q/k normalisation (over the last axis, float32 statistics, eps 1e-6):
  "rms_norm" (learned scale), "layer_norm" (learned scale and bias) or
  "fp32_layer_norm" (no parameters). Parameters on the `kv` axis."""
  if kind == "rms_norm":
    return rms_norm(name=name, epsilon=NORM_EPS)
  affine = kind == "layer_norm"
  return nn.LayerNorm(epsilon=NORM_EPS, use_bias=affine, use_scale=affine, dtype=jnp.float32,
                      name=name, scale_init=partitioned(nn.initializers.ones, ("kv",)),
                      bias_init=partitioned(nn.initializers.zeros, ("kv",)))


class JointAttention(nn.Module):
  """Attention over [x tokens | context tokens], each stream with its own q/k/v
  projection, q/k norms and output projection; without `context` it is plain
  self-attention over x (the dual-attention `attn2`).

  Attributes:
    num_heads, head_dim: heads and their width.
    qk_norm: None or a name in QK_NORMS.
    context_pre_only: the context stream gets no output (last block).
    dtype: compute dtype; parameters float32, norms and softmax float32.
    backend: attention backend, see `ldm_jax.models.attention.BACKENDS`.
  """
  num_heads: int
  head_dim: int
  qk_norm: str | None = None
  context_pre_only: bool = False
  dtype: Dtype = jnp.float32
  backend: str = "xla"

  def _qkv(self, x_btd: jax.Array, prefix: str):
    qkv = DenseGeneral((3, self.num_heads, self.head_dim), in_dims=1,
                       kernel_axes=("embed", None, "heads", "kv"),
                       bias_axes=(None, "heads", "kv"), dtype=self.dtype,
                       name=f"{prefix}qkv")(x_btd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, T, H, Dh) each
    if self.qk_norm is not None:
      q = head_norm(self.qk_norm, name=f"{prefix}q_norm")(q).astype(self.dtype)
      k = head_norm(self.qk_norm, name=f"{prefix}k_norm")(k).astype(self.dtype)
    return q, k, v

  def _proj(self, out_bthd: jax.Array, width: int, name: str) -> jax.Array:
    return DenseGeneral((width,), in_dims=2, kernel_axes=("heads", "kv", "embed"),
                        bias_axes=("embed",), dtype=self.dtype, name=name)(out_bthd)

  @nn.compact
  def __call__(self, x_btd: jax.Array, c_bld: jax.Array | None = None):
    """Returns the x output, or (x output, context output or None) given `c_bld`."""
    width, n_x = x_btd.shape[-1], x_btd.shape[1]
    q, k, v = self._qkv(x_btd, "")
    if c_bld is not None:
      cq, ck, cv = self._qkv(c_bld, "context_")
      q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((q, cq), (k, ck), (v, cv)))
    out = dot_product_attention(q, k, v, backend=self.backend)  # (B, T, H, Dh)
    x_out = self._proj(out[:, :n_x], width, "proj")
    if c_bld is None:
      return x_out
    if self.context_pre_only:
      return x_out, None
    return x_out, self._proj(out[:, n_x:], width, "context_proj")


class MMDiTBlock(nn.Module):
  """One joint block: adaLN-Zero per stream, joint attention, (dual blocks) x-only
  attention, MLP per stream. The pre-only (last) block modulates its context with
  (scale, shift) only and returns no context."""
  num_heads: int
  head_dim: int
  qk_norm: str | None = None
  context_pre_only: bool = False
  dual_attention: bool = False
  dtype: Dtype = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x_btd: jax.Array, c_bld: jax.Array, temb_bd: jax.Array):
    hidden = x_btd.shape[-1]
    cond = nn.silu(temb_bd)
    n_mod = 9 if self.dual_attention else 6
    x_mod = jnp.split(zero_dense(n_mod * hidden, ("embed", "mlp"), name="x_adaLN_modulation",
                                 dtype=self.dtype)(cond), n_mod, -1)
    # diffusers' chunk order: (shift, scale, gate) attn, MLP, [attn2].
    x_norm = layer_norm(name="x_norm1", affine=False, epsilon=NORM_EPS)(x_btd)
    h_x = modulate(x_norm, x_mod[0], x_mod[1])
    c_norm = layer_norm(name="context_norm1", affine=False, epsilon=NORM_EPS)(c_bld)
    if self.context_pre_only:
      scale, shift = jnp.split(zero_dense(2 * hidden, ("embed", "mlp"),
                                          name="context_adaLN_modulation",
                                          dtype=self.dtype)(cond), 2, -1)
      h_c, c_mod = modulate(c_norm, shift, scale), None
    else:
      c_mod = jnp.split(zero_dense(6 * hidden, ("embed", "mlp"), name="context_adaLN_modulation",
                                   dtype=self.dtype)(cond), 6, -1)
      h_c = modulate(c_norm, c_mod[0], c_mod[1])
    attn = JointAttention(self.num_heads, self.head_dim, self.qk_norm, self.context_pre_only,
                          dtype=self.dtype, backend=self.attention, name="attn")
    a_x, a_c = attn(h_x.astype(self.dtype), h_c.astype(self.dtype))
    x_btd = x_btd + x_mod[2][:, None] * a_x
    if self.dual_attention:  # same normalised x, its own shift / scale / gate
      h2 = modulate(x_norm, x_mod[6], x_mod[7]).astype(self.dtype)
      x_btd = x_btd + x_mod[8][:, None] * JointAttention(
          self.num_heads, self.head_dim, self.qk_norm, dtype=self.dtype,
          backend=self.attention, name="attn2")(h2)
    h_x = modulate(layer_norm(name="x_norm2", affine=False, epsilon=NORM_EPS)(x_btd),
                   x_mod[3], x_mod[4])
    x_btd = x_btd + x_mod[5][:, None] * Mlp(4 * hidden, dtype=self.dtype,
                                            name="mlp")(h_x.astype(self.dtype))
    x_btd = nn.with_logical_constraint(x_btd, ("batch", "tokens", "act_embed"))
    if self.context_pre_only:
      return x_btd, None
    c_bld = c_bld + c_mod[2][:, None] * a_c
    h_c = modulate(layer_norm(name="context_norm2", affine=False, epsilon=NORM_EPS)(c_bld),
                   c_mod[3], c_mod[4])
    c_bld = c_bld + c_mod[5][:, None] * Mlp(4 * hidden, dtype=self.dtype,
                                            name="context_mlp")(h_c.astype(self.dtype))
    return x_btd, nn.with_logical_constraint(c_bld, ("batch", "tokens", "act_embed"))


class TextProjection(nn.Module):
  """Pooled text embedding -> Dense -> SiLU -> Dense (diffusers' `text_embedder`)."""
  hidden_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pooled_bp: jax.Array) -> jax.Array:
    init = nn.initializers.normal(0.02)
    # The input side is "embed" (fsdp-sharded): SD3's is 2048 wide, too big to replicate.
    x = dense(self.hidden_size, ("embed", "mlp"), name="mlp_0", kernel_init=init,
              dtype=self.dtype)(pooled_bp.astype(self.dtype))
    return dense(self.hidden_size, ("mlp", "embed"), name="mlp_2", kernel_init=init,
                 dtype=self.dtype)(nn.silu(x))


class FinalLayer(nn.Module):
  """adaLN with (scale, shift) order (diffusers' `AdaLayerNormContinuous`) ->
  LayerNorm -> linear to patch pixels; zero-initialised."""
  hidden_size: int
  patch_size: int
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_btd: jax.Array, temb_bd: jax.Array) -> jax.Array:
    scale, shift = jnp.split(zero_dense(2 * self.hidden_size, ("embed", "mlp"),
                                        name="adaLN_modulation",
                                        dtype=self.dtype)(nn.silu(temb_bd)), 2, -1)
    x_btd = modulate(layer_norm(name="norm_final", affine=False, epsilon=NORM_EPS)(x_btd),
                     shift, scale)
    return zero_dense(self.patch_size ** 2 * self.out_channels, ("embed", None),
                      name="linear", dtype=self.dtype)(x_btd.astype(self.dtype))


class MMDiT(nn.Module):
  """SD3 / SD3.5 multimodal diffusion transformer (diffusers `SD3Transformer2DModel`;
  diffusers' config names in brackets).

  Attributes:
    input_size: [sample_size] base latent size; sets the position grid's scale.
    patch_size: patch size.
    in_channels: latent channels in.
    out_channels: latent channels out (None: in_channels).
    depth: [num_layers] number of joint blocks.
    num_heads: [num_attention_heads] heads; hidden width = num_heads * head_dim.
    head_dim: [attention_head_dim] width of each head.
    context_dim: [joint_attention_dim] width of the text token features.
    caption_projection_dim: width the text tokens are projected to; must equal the
      hidden width (the joint blocks need it); None means the hidden width.
    pooled_dim: [pooled_projection_dim] width of the pooled text embedding.
    pos_embed_max_size: side of the position grid inputs are cropped from, in
      patches (None: the grid is computed for each input size).
    dual_attention_layers: indices of the MMDiT-X blocks (extra x-only attention).
    qk_norm: q/k normalisation per head: False / None, True (= "rms_norm"), or one
      of QK_NORMS.
    dtype: compute dtype, float32 or bfloat16. Parameters, norm statistics, the
      softmax and the output stay float32.
    remat: activation rematerialisation of each block, one of `dit.REMAT_POLICIES`.
    attention: attention backend, one of `ldm_jax.models.attention.BACKENDS`.
  """
  input_size: int = 128
  patch_size: int = 2
  in_channels: int = 16
  out_channels: int | None = None
  depth: int = 18
  num_heads: int = 18
  head_dim: int = 64
  context_dim: int = 4096
  caption_projection_dim: int | None = None
  pooled_dim: int = 2048
  pos_embed_max_size: int | None = 96
  dual_attention_layers: tuple = ()
  qk_norm: bool | str | None = False
  dtype: Dtype = jnp.float32
  remat: str = "none"
  attention: str = "xla"

  @property
  def hidden_size(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def output_channels(self) -> int:
    return self.in_channels if self.out_channels is None else self.out_channels

  def check_config(self) -> None:
    """Raises UserError for an inconsistent configuration."""
    qk_norm_type(self.qk_norm)
    check(self.remat in REMAT_POLICIES,
          f"MMDiT: unknown remat policy {self.remat!r}; valid: {list(REMAT_POLICIES)}")
    check(self.attention in BACKENDS,
          f"MMDiT: unknown attention backend {self.attention!r}; valid: {list(BACKENDS)}")
    check(self.caption_projection_dim in (None, self.hidden_size),
          f"MMDiT: caption_projection_dim {self.caption_projection_dim} must equal the hidden "
          f"width num_heads * head_dim = {self.hidden_size} (the joint blocks' context width), "
          "or be None")
    bad = [i for i in self.dual_attention_layers if not 0 <= i < self.depth]
    check(not bad, f"MMDiT: dual_attention_layers {bad} are not block indices 0..{self.depth - 1}")
    check(self.pos_embed_max_size is None or self.pos_embed_max_size > 0,
          f"MMDiT: pos_embed_max_size {self.pos_embed_max_size} must be positive or None")

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array, pooled: jax.Array,
               train: bool = False, skip_layers: tuple = ()) -> jax.Array:
    """x: (B, H, W, C) latents; t: (B,) timesteps as diffusers' transformer takes them
    (the SD3 pipeline passes sigma * 1000); context: (B, L, context_dim) text tokens;
    pooled: (B, pooled_dim); skip_layers: block indices to skip (identity), as
    diffusers' skip-layer guidance. `train` is accepted for API symmetry (no dropout).

    Returns (B, H, W, out_channels) float32.
    """
    del train
    self.check_config()
    check(x.ndim == 4 and x.shape[-1] == self.in_channels,
          f"MMDiT: latents must be (B, H, W, {self.in_channels}), got shape {x.shape}")
    batch, height, width, _ = x.shape
    p, hidden = self.patch_size, self.hidden_size
    check(height % p == 0 and width % p == 0,
          f"MMDiT: latent size {height}x{width} is not divisible by patch size {p}; use "
          f"multiples of {p}")
    grid_h, grid_w = height // p, width // p
    limit = self.pos_embed_max_size
    check(limit is None or (grid_h <= limit and grid_w <= limit),
          f"MMDiT: latent size {height}x{width} exceeds the position grid: at most "
          f"{limit * p if limit else 0}x{limit * p if limit else 0} (pos_embed_max_size "
          f"{limit} patches of {p})")
    check(context.ndim == 3 and context.shape[0] == batch
          and context.shape[-1] == self.context_dim,
          f"MMDiT: context must be (B={batch}, L, context_dim={self.context_dim}), got shape "
          f"{context.shape}")
    check(pooled.shape == (batch, self.pooled_dim),
          f"MMDiT: pooled must be (B={batch}, pooled_dim={self.pooled_dim}), got shape "
          f"{pooled.shape}")
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,)) if jnp.ndim(t) == 0 else t
    check(t.shape == (batch,), f"MMDiT: timesteps must be (B={batch},), got shape {t.shape}")
    skip = set(skip_layers)
    bad = sorted(i for i in skip if not 0 <= i < self.depth)
    check(not bad, f"MMDiT: skip_layers {bad} are not block indices 0..{self.depth - 1}")

    x = conv(hidden, p, strides=p, padding="VALID", name="x_embedder",
             kernel_init=nn_xavier_flat(), dtype=self.dtype)(x.astype(self.dtype))
    x = x.reshape(batch, grid_h * grid_w, hidden)  # (B, T, D)
    pos = sd3_pos_embed(hidden, grid_h, grid_w, self.input_size // p, self.pos_embed_max_size)
    x = x + jnp.asarray(pos, self.dtype)[None]
    temb = (TimestepEmbedder(hidden, dtype=self.dtype, name="t_embedder")(t)
            + TextProjection(hidden, dtype=self.dtype, name="pooled_embedder")(pooled))
    c = dense(hidden, (None, "embed"), name="context_embedder",
              dtype=self.dtype)(context.astype(self.dtype))  # (B, L, D)

    block_class = MMDiTBlock
    if self.remat != "none":
      policy = None if self.remat == "full" else getattr(jax.checkpoint_policies, self.remat)
      block_class = nn.remat(MMDiTBlock, policy=policy)
    qk_norm = qk_norm_type(self.qk_norm)
    for i in range(self.depth):
      if i in skip:
        continue
      x, c = block_class(self.num_heads, self.head_dim, qk_norm,
                         context_pre_only=i == self.depth - 1,
                         dual_attention=i in self.dual_attention_layers, dtype=self.dtype,
                         attention=self.attention, name=f"blocks_{i}")(x, c, temb)
    out_ch = self.output_channels
    x = FinalLayer(hidden, p, out_ch, dtype=self.dtype, name="final_layer")(x, temb)
    x = x.reshape(batch, grid_h, grid_w, p, p, out_ch)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height, width, out_ch)
    return x.astype(jnp.float32)


def build(model_config, **overrides) -> MMDiT:
  """An `MMDiT` from `config.model` (`variant` from VARIANTS plus field overrides)."""
  kwargs = variant_kwargs(MMDiT, VARIANTS, model_config, overrides)
  kwargs["dtype"] = compute_dtype(kwargs.get("dtype", jnp.float32))
  if "qk_norm" in kwargs:
    qk_norm_type(kwargs["qk_norm"])
  size, patch = kwargs.get("input_size", 128), kwargs.get("patch_size", 2)
  check(size % patch == 0,
        f"MMDiT: input size {size} is not divisible by patch size {patch} "
        f"(variant {model_config.variant!r}); use a multiple of {patch}")
  model = MMDiT(**kwargs)
  model.check_config()
  return model
