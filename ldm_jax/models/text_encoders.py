"""Text encoders of latent text-to-image models: the CLIP text tower and the T5 encoder.

Both compute what transformers' PyTorch modules compute for the same weights
(`CLIPTextModelWithProjection` / `CLIPTextModel` and `T5EncoderModel`), so weights
converted by `ldm_jax.convert.text_encoders` give the same embeddings SD3 / SDXL
pipelines feed their denoisers.

CLIPTextEncoder. Token + learned position embeddings, pre-LayerNorm transformer
layers with causal self-attention (scaled by 1/sqrt(head_dim)) and a two-layer MLP,
a final LayerNorm. The pooled output is the final-normed state at one token per
sequence: with the legacy `eos_token_id == 2` (configs written before transformers
fixed it) the position of the largest id in the row, otherwise the first position
holding `eos_token_id` (position 0 when there is none). `text_embeds` is the pooled
output times the bias-free text projection.

T5Encoder. Token embeddings (no position table), layers of RMS-style "T5
LayerNorm" (no mean subtraction, no bias, float32 statistics) -> self-attention
WITHOUT the 1/sqrt(head_dim) scale plus a relative position bias -> RMS norm ->
feed-forward (gated: act(x W0) * (x W1), or plain act(x W)), all projections
bias-free. The bias table lives in the model (`relative_attention_bias`, as
transformers keeps it in the first layer) and is shared by all layers.

Outputs ("hidden_states" follows transformers' `output_hidden_states=True`):
  CLIP  hidden_states: num_layers + 1 arrays, the embeddings then every layer's output
        (the last one BEFORE the final LayerNorm; SD3 / SDXL use hidden_states[-2]);
        last_hidden_state (after the final LayerNorm), pooled, text_embeds (if
        projection_dim).
  T5    hidden_states: num_layers + 1 arrays, the embeddings, the outputs of layers
        1 .. num_layers - 1, then last_hidden_state (after the final norm) as
        transformers puts it there; last_hidden_state.

Logical axis names (see `ldm_jax.models.layers`): embed, mlp, heads, kv, norm as
elsewhere, plus `vocab` (rows of a token-embedding table). Rows of the CLIP
position table and of the T5 bucket table, and the q/k/v split, are unnamed
(small; never sharded).

Precision: parameters float32; matmuls in `dtype`; the residual stream, norms,
attention logits and softmax in float32.
"""

import math
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.errors import check
from ldm_jax.models.layers import DenseGeneral, Dtype, compute_dtype, dense, layer_norm, partitioned

# Activations a CLIP config's `hidden_act` (or a T5 `feed_forward_proj` suffix) may
# name, as transformers' ACT2FN computes them.
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}
LEGACY_CLIP_EOS = 2  # configs with this eos id pool at the argmax of the ids


def activation(name: str):
  """The activation function `name` (a key of ACTIVATIONS)."""
  check(name in ACTIVATIONS, f"unknown activation {name!r}; valid: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def t5_feed_forward(feed_forward_proj: str) -> tuple[bool, str]:
  """(gated, activation name) of a T5 `feed_forward_proj` such as "gated-gelu" or
  "relu"; "gated-gelu" means the tanh GELU (gelu_new), as in T5 v1.1."""
  parts = feed_forward_proj.split("-")
  gated = len(parts) == 2 and parts[0] == "gated"
  check(len(parts) == 1 or gated, f"T5 feed_forward_proj {feed_forward_proj!r} is not "
        "'ACT' or 'gated-ACT' (e.g. 'relu', 'gated-gelu', 'gated-silu')")
  act = "gelu_new" if feed_forward_proj == "gated-gelu" else parts[-1]
  check(act in ACTIVATIONS, f"T5 feed_forward_proj {feed_forward_proj!r}: unknown activation "
        f"{parts[-1]!r}; valid: {sorted(ACTIVATIONS)}")
  return gated, act


def _embed(num: int, features: int, axes, name: str) -> nn.Embed:
  return nn.Embed(num, features, dtype=jnp.float32, name=name,
                  embedding_init=partitioned(nn.initializers.normal(0.02), axes))


def _attention(q, k, v, keep, scale: float, bias=None, dtype=jnp.float32):
  """softmax(scale * q k^T + bias, masked where `keep` is False) v, logits and softmax
  in float32. q, k, v: (B, L, H, Dh); keep: broadcastable to (B, H, L, L); bias
  (1, H, L, L) or None."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  logits = logits * scale if scale != 1 else logits
  if bias is not None:
    logits = logits + bias
  if keep is not None:
    logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(dtype))


class CLIPLayer(nn.Module):
  """Pre-LN transformer layer of the CLIP text tower (causal attention, MLP)."""
  hidden_size: int
  intermediate_size: int
  num_heads: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_btd: jax.Array, keep) -> jax.Array:
    heads, dh = self.num_heads, self.hidden_size // self.num_heads
    h = layer_norm(name="layer_norm1", epsilon=self.layer_norm_eps)(x_btd).astype(self.dtype)
    qkv = DenseGeneral((3, heads, dh), in_dims=1, kernel_axes=("embed", None, "heads", "kv"),
                       bias_axes=(None, "heads", "kv"), dtype=self.dtype, name="qkv")(h)
    out = _attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], keep, dh ** -0.5,
                     dtype=self.dtype)
    out = DenseGeneral((self.hidden_size,), in_dims=2, kernel_axes=("heads", "kv", "embed"),
                       bias_axes=("embed",), dtype=self.dtype, name="out_proj")(out)
    x_btd = x_btd + out.astype(jnp.float32)
    h = layer_norm(name="layer_norm2", epsilon=self.layer_norm_eps)(x_btd).astype(self.dtype)
    h = dense(self.intermediate_size, ("embed", "mlp"), name="fc1", dtype=self.dtype)(h)
    h = activation(self.hidden_act)(h)
    h = dense(self.hidden_size, ("mlp", "embed"), name="fc2", dtype=self.dtype)(h)
    return x_btd + h.astype(jnp.float32)


class CLIPTextEncoder(nn.Module):
  """CLIP text transformer (+ optional text projection), as transformers'
  `CLIPTextModelWithProjection` (projection_dim set) or `CLIPTextModel` (None).

  Attributes:
    vocab_size, hidden_size, intermediate_size, num_layers, num_heads: sizes.
    max_positions: rows of the position table (longest sequence).
    hidden_act: MLP activation, a key of ACTIVATIONS ("quick_gelu" for OpenAI
      CLIP-L, "gelu" for OpenCLIP bigG).
    layer_norm_eps: LayerNorm epsilon.
    projection_dim: width of the bias-free text projection; None = no projection.
    eos_token_id: token whose (first) position gives the pooled output; 2 selects
      the legacy rule (position of the largest id).
    dtype: compute dtype; parameters stay float32.
  """
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_layers: int = 12
  num_heads: int = 12
  max_positions: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int | None = 768
  eos_token_id: int = 49407
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> dict:
    """Encodes `input_ids` (B, L) ints; `attention_mask` (B, L), 1 = real token, 0 =
    padding (keys masked out, on top of the causal mask), optional."""
    check(self.hidden_size % self.num_heads == 0, f"CLIP hidden_size {self.hidden_size} is "
          f"not divisible by num_heads {self.num_heads}")
    _, length = input_ids.shape
    check(length <= self.max_positions, f"CLIP text encoder: sequence length {length} exceeds "
          f"max_positions {self.max_positions}")
    activation(self.hidden_act)
    tokens = _embed(self.vocab_size, self.hidden_size, ("vocab", "embed"), "token_embedding")
    positions = _embed(self.max_positions, self.hidden_size, (None, "embed"),
                       "position_embedding")
    x = tokens(input_ids) + positions(jnp.arange(length))[None]
    keep = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if attention_mask is not None:
      keep = keep & (attention_mask[:, None, None, :] > 0)
    hidden_states = [x]
    for i in range(self.num_layers):
      x = CLIPLayer(self.hidden_size, self.intermediate_size, self.num_heads, self.hidden_act,
                    self.layer_norm_eps, self.dtype, name=f"layers_{i}")(x, keep)
      hidden_states.append(x)
    last = layer_norm(name="final_layer_norm", epsilon=self.layer_norm_eps)(x)
    if self.eos_token_id == LEGACY_CLIP_EOS:
      where = jnp.argmax(input_ids, axis=-1)
    else:
      where = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
    pooled = jnp.take_along_axis(last, where[:, None, None], axis=1)[:, 0]
    out = dict(hidden_states=tuple(hidden_states), last_hidden_state=last, pooled=pooled)
    if self.projection_dim:
      proj = dense(self.projection_dim, ("embed", "mlp"), name="text_projection",
                   use_bias=False, dtype=self.dtype)
      out["text_embeds"] = proj(pooled.astype(self.dtype)).astype(jnp.float32)
    return out


def t5_relative_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """(length, length) int32 bucket of key position minus query position for a
  bidirectional (encoder) T5: half the buckets per sign, the first half of those
  exact distances, the rest log-spaced up to `max_distance` (float32 arithmetic,
  as transformers does it). Computed with numpy: lengths are static."""
  rel = np.arange(length)[None, :] - np.arange(length)[:, None]
  half = num_buckets // 2
  buckets = (rel > 0).astype(np.int64) * half
  dist = np.abs(rel)
  exact = half // 2
  with np.errstate(divide="ignore"):
    logs = np.log(dist.astype(np.float32) / np.float32(exact))
  far = logs / np.float32(math.log(max_distance / exact)) * np.float32(half - exact)
  far = exact + np.where(dist < exact, 0, far).astype(np.int64)
  far = np.minimum(far, half - 1)
  return (buckets + np.where(dist < exact, dist, far)).astype(np.int32)


class T5Norm(nn.Module):
  """T5 LayerNorm: x / rms(x) * scale, float32 statistics, no mean, no bias."""
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", partitioned(nn.initializers.ones, ("norm",)), (x.shape[-1],),
                       jnp.float32)
    x = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return scale * (x * jax.lax.rsqrt(var + self.epsilon))


class T5Layer(nn.Module):
  """T5 encoder layer: norm -> unscaled biased self-attention -> norm -> feed-forward."""
  d_model: int
  d_kv: int
  d_ff: int
  num_heads: int
  feed_forward_proj: str = "gated-gelu"
  layer_norm_epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_btd: jax.Array, bias: jax.Array, keep) -> jax.Array:
    heads, dh = self.num_heads, self.d_kv
    init = nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2, 3))
    qkv_kernel = self.param("qkv", partitioned(init, ("embed", None, "heads", "kv")),
                            (self.d_model, 3, heads, dh), jnp.float32)
    o_init = nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2)
    o_kernel = self.param("o", partitioned(o_init, ("heads", "kv", "embed")),
                          (heads, dh, self.d_model), jnp.float32)
    h = T5Norm(self.layer_norm_epsilon, name="attn_norm")(x_btd).astype(self.dtype)
    qkv = jnp.einsum("btd,dshk->btshk", h, qkv_kernel.astype(self.dtype))
    out = _attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], keep, 1.0, bias,
                     dtype=self.dtype)
    out = jnp.einsum("bthk,hkd->btd", out, o_kernel.astype(self.dtype))
    x_btd = x_btd + out.astype(jnp.float32)
    gated, act = t5_feed_forward(self.feed_forward_proj)
    h = T5Norm(self.layer_norm_epsilon, name="ffn_norm")(x_btd).astype(self.dtype)
    if gated:
      h = (activation(act)(dense(self.d_ff, ("embed", "mlp"), name="wi_0", use_bias=False,
                                 dtype=self.dtype)(h))
           * dense(self.d_ff, ("embed", "mlp"), name="wi_1", use_bias=False, dtype=self.dtype)(h))
    else:
      h = activation(act)(dense(self.d_ff, ("embed", "mlp"), name="wi", use_bias=False,
                                dtype=self.dtype)(h))
    h = dense(self.d_model, ("mlp", "embed"), name="wo", use_bias=False, dtype=self.dtype)(h)
    return x_btd + h.astype(jnp.float32)


class T5Encoder(nn.Module):
  """The encoder stack of T5, as transformers' `T5EncoderModel`.

  Attributes:
    vocab_size, d_model, d_kv (per-head width), d_ff, num_layers, num_heads: sizes.
    relative_attention_num_buckets, relative_attention_max_distance: position bias.
    feed_forward_proj: "gated-gelu" (T5 v1.1, tanh GELU), "relu" (original T5),
      "gated-silu", or any "ACT" / "gated-ACT" with ACT in ACTIVATIONS.
    layer_norm_epsilon: T5 LayerNorm epsilon.
    dtype: compute dtype; parameters stay float32.
  """
  vocab_size: int = 32128
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  feed_forward_proj: str = "gated-gelu"
  layer_norm_epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> dict:
    """Encodes `input_ids` (B, L) ints; `attention_mask` (B, L), 1 = real token, 0 =
    padding (masked out as keys), optional."""
    t5_feed_forward(self.feed_forward_proj)
    _, length = input_ids.shape
    x = _embed(self.vocab_size, self.d_model, ("vocab", "embed"), "shared")(input_ids)
    table = self.param("relative_attention_bias",
                       partitioned(nn.initializers.normal(0.02), (None, "heads")),
                       (self.relative_attention_num_buckets, self.num_heads), jnp.float32)
    buckets = t5_relative_buckets(length, self.relative_attention_num_buckets,
                                  self.relative_attention_max_distance)
    bias = jnp.transpose(table[buckets], (2, 0, 1))[None]  # (1, H, L, L)
    keep = None if attention_mask is None else attention_mask[:, None, None, :] > 0
    hidden_states = [x]
    for i in range(self.num_layers):
      x = T5Layer(self.d_model, self.d_kv, self.d_ff, self.num_heads, self.feed_forward_proj,
                  self.layer_norm_epsilon, self.dtype, name=f"layers_{i}")(x, bias, keep)
      hidden_states.append(x)
    last = T5Norm(self.layer_norm_epsilon, name="final_norm")(x)
    hidden_states[-1] = last
    return dict(hidden_states=tuple(hidden_states), last_hidden_state=last)


_CLIP_L = dict(kind="clip", vocab_size=49408, hidden_size=768, intermediate_size=3072,
               num_layers=12, num_heads=12, max_positions=77, hidden_act="quick_gelu",
               layer_norm_eps=1e-5, projection_dim=768, eos_token_id=2)
VARIANTS = {
    # OpenAI CLIP ViT-L/14 text tower (SD3 text_encoder, SDXL text_encoder).
    "clip-l-14": _CLIP_L,
    # OpenCLIP ViT-bigG/14 text tower (SD3 text_encoder_2, SDXL text_encoder_2).
    "clip-g-14": dict(_CLIP_L, hidden_size=1280, intermediate_size=5120, num_layers=32,
                      num_heads=20, hidden_act="gelu", projection_dim=1280),
    # T5 v1.1 XXL encoder (SD3 text_encoder_3).
    "t5-v1_1-xxl": dict(kind="t5", vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240,
                        num_layers=24, num_heads=64, relative_attention_num_buckets=32,
                        relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                        layer_norm_epsilon=1e-6),
    # Tiny ones for tests and CPU demos.
    "tiny-clip": dict(_CLIP_L, vocab_size=1000, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, projection_dim=32, eos_token_id=2),
    # The captioned-shapes demo's trainable encoder over the built-in word tokenizer
    # (vocabulary and length set from the tokenizer by the config).
    "shapes-words": dict(_CLIP_L, vocab_size=17, hidden_size=128, intermediate_size=256,
                         num_layers=2, num_heads=4, max_positions=12, hidden_act="gelu",
                         projection_dim=None),
    "tiny-t5": dict(kind="t5", vocab_size=1000, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                    num_heads=4, relative_attention_num_buckets=32,
                    relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                    layer_norm_epsilon=1e-6),
}
# Parameter counts, equal to transformers' models of the same configs (tested).
PARAM_COUNTS = {"clip-l-14": 123_650_304, "clip-g-14": 694_659_840,
                "t5-v1_1-xxl": 4_762_310_656}
MODEL_CLASSES = {"clip": CLIPTextEncoder, "t5": T5Encoder}


def build(name_or_kwargs: str | Mapping, **overrides) -> CLIPTextEncoder | T5Encoder:
  """A text encoder from a VARIANTS name or a dict of fields plus `kind`
  ("clip" | "t5"); `overrides` replace fields (e.g. dtype="bfloat16")."""
  if isinstance(name_or_kwargs, str):
    check(name_or_kwargs in VARIANTS, f"unknown text encoder variant {name_or_kwargs!r}; "
          f"valid: {sorted(VARIANTS)}")
    kwargs = dict(VARIANTS[name_or_kwargs])
  else:
    kwargs = dict(name_or_kwargs)
  kwargs.update(overrides)
  kind = kwargs.pop("kind", None)
  check(kind in MODEL_CLASSES, f"text encoder kind {kind!r}; valid: {sorted(MODEL_CLASSES)}")
  cls = MODEL_CLASSES[kind]
  fields = {f.name for f in cls.__dataclass_fields__.values()} - {"parent", "name"}
  unknown = sorted(set(kwargs) - fields)
  check(not unknown, f"{cls.__name__}: unknown fields {unknown}; valid: {sorted(fields)}")
  if "dtype" in kwargs:
    kwargs["dtype"] = compute_dtype(kwargs["dtype"])
  return cls(**kwargs)


def kind_of(module) -> str:
  """"clip" or "t5" for a module built by `build`."""
  for kind, cls in MODEL_CLASSES.items():
    if isinstance(module, cls):
      return kind
  raise TypeError(f"not a text encoder: {type(module).__name__}")


def config_of(module) -> dict:
  """The fields of a text encoder module plus `kind` (what `build` takes); dtype left out."""
  out = {"kind": kind_of(module)}
  for f in module.__dataclass_fields__:
    if f not in ("parent", "name", "dtype"):
      out[f] = getattr(module, f)
  return out


def param_shapes(module, length: int = 8):
  """The boxed params tree of ShapeDtypeStructs of `module`'s init (nothing allocated)."""
  ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
  return jax.eval_shape(module.init, jax.random.key(0), ids)["params"]
