"""diffusers `SD3Transformer2DModel` folders <-> ldm_jax `MMDiT` parameters.

A folder holds config.json and diffusion_pytorch_model[.fp16].safetensors (or its
shards plus the index json), e.g. an SD3 / SD3.5 pipeline's `transformer/`.

The key table below is explicit (one rule per tensor, `{i}` = block index) and
enforced strictly in both directions by `ldm_jax.convert.common`: q/k norms
(`attn.norm_q` / `norm_k` / `norm_added_q` / `norm_added_k`, `attn2.norm_q` /
`norm_k`), dual-attention (`attn2.*`) and the last block's pre-only context stream
(no `attn.to_add_out`, no `ff_context`, a 2 x hidden `norm1_context.linear`) included.
torch Linear weights are (out, in), ours (in, out); separate q/k/v Linears become one
(hidden, 3, heads, head_dim) kernel; output Linears (heads, head_dim, hidden) kernels.

The position grid `pos_embed.pos_embed` (a buffer of diffusers, present when
`pos_embed_max_size` is set) is not a parameter here: ldm_jax computes it. Import
checks the stored grid equals ours to the precision of its dtype (UserError if
not); export writes ours.

Usage:
  params, kwargs = from_diffusers("stable-diffusion-3.5-medium/transformer")
  model = MMDiT(**kwargs); model.apply({"params": params}, x_nhwc, t, context, pooled)
"""

import dataclasses
import os
from typing import Mapping

import ml_dtypes
import numpy as np

from ldm_jax.convert import common
from ldm_jax.convert.common import Rule
from ldm_jax.errors import check
from ldm_jax.models.layers import compute_dtype
from ldm_jax.models.mmdit import MMDiT, qk_norm_type, sd3_pos_embed

FREQ_DIM = 256  # timestep feature width
CLASS_NAME = "SD3Transformer2DModel"
POS_EMBED = "pos_embed.pos_embed"
# diffusers config keys -> (our field, diffusers' default when the key is absent).
_KEYS = {
    "sample_size": ("input_size", 128), "patch_size": ("patch_size", 2),
    "in_channels": ("in_channels", 16), "out_channels": ("out_channels", 16),
    "num_layers": ("depth", 18), "num_attention_heads": ("num_heads", 18),
    "attention_head_dim": ("head_dim", 64), "joint_attention_dim": ("context_dim", 4096),
    "caption_projection_dim": ("caption_projection_dim", 1152),
    "pooled_projection_dim": ("pooled_dim", 2048),
    "pos_embed_max_size": ("pos_embed_max_size", 96),
    "dual_attention_layers": ("dual_attention_layers", ()), "qk_norm": ("qk_norm", None),
}
_METADATA = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


def config_from_diffusers(cfg: Mapping) -> dict:
  """Our `MMDiT` kwargs from a diffusers SD3Transformer2DModel config.json dict.

  Raises:
    UserError for another class, unknown keys, or values ldm_jax does not support
    (a caption projection width other than the hidden width, an unknown qk_norm).
  """
  what = "diffusers SD3 transformer config"
  name = cfg.get("_class_name", CLASS_NAME)
  check(name == CLASS_NAME, f"{what}: _class_name {name!r} is not {CLASS_NAME!r}")
  unknown = sorted(set(cfg) - set(_KEYS) - set(_METADATA))
  check(not unknown, f"{what}: unknown / unsupported keys {unknown}; known: {sorted(_KEYS)}")
  get = {ours: cfg.get(key, default) for key, (ours, default) in _KEYS.items()}
  hidden = get["num_heads"] * get["head_dim"]
  check(get["caption_projection_dim"] == hidden,
        f"{what}: caption_projection_dim {get['caption_projection_dim']} differs from the "
        f"hidden width num_attention_heads * attention_head_dim = {hidden}; diffusers' joint "
        "blocks cannot run such a model either")
  out = dict(get, caption_projection_dim=None,
             out_channels=get["out_channels"] if get["out_channels"] is not None
             else get["in_channels"],
             dual_attention_layers=tuple(int(i) for i in get["dual_attention_layers"] or ()),
             qk_norm=qk_norm_type(get["qk_norm"]) or False)
  _model(out).check_config()
  return out


def diffusers_config(kwargs: Mapping) -> dict:
  """The diffusers config.json dict of `MMDiT(**kwargs)` (inverse of
  `config_from_diffusers`)."""
  model = _model(kwargs)
  model.check_config()
  return dict(_class_name=CLASS_NAME, sample_size=model.input_size,
              patch_size=model.patch_size, in_channels=model.in_channels,
              out_channels=model.output_channels, num_layers=model.depth,
              num_attention_heads=model.num_heads, attention_head_dim=model.head_dim,
              joint_attention_dim=model.context_dim, caption_projection_dim=model.hidden_size,
              pooled_projection_dim=model.pooled_dim,
              pos_embed_max_size=model.pos_embed_max_size,
              dual_attention_layers=list(model.dual_attention_layers),
              qk_norm=qk_norm_type(model.qk_norm))


def _model(kwargs: Mapping) -> MMDiT:
  fields = {f.name for f in dataclasses.fields(MMDiT)} - {"parent", "name"}
  unknown = sorted(set(kwargs) - fields)
  check(not unknown, f"MMDiT config has unknown fields {unknown}; valid: {sorted(fields)}")
  kwargs = dict(kwargs)
  if "dtype" in kwargs:
    kwargs["dtype"] = compute_dtype(kwargs["dtype"])
  if isinstance(kwargs.get("dual_attention_layers"), list):
    kwargs["dual_attention_layers"] = tuple(kwargs["dual_attention_layers"])
  return MMDiT(**kwargs)


def _qkv(target: str, sources: tuple[str, str, str], d: int, heads: int, dh: int) -> list[Rule]:
  """Three torch Linear(d, heads * dh) (q, k, v) <-> DenseGeneral kernel
  (d, 3, heads, dh) and bias (3, heads, dh)."""
  inner = heads * dh
  return [Rule(f"{target}/kernel", tuple(f"{s}.weight" for s in sources), ((inner, d),) * 3,
               fwd=lambda *w: np.stack([x.T for x in w], 1).reshape(d, 3, heads, dh),
               inv=lambda k: tuple(k[:, j].reshape(d, inner).T for j in range(3))),
          Rule(f"{target}/bias", tuple(f"{s}.bias" for s in sources), ((inner,),) * 3,
               fwd=lambda *b: np.stack(b).reshape(3, heads, dh),
               inv=lambda b: tuple(b[j].reshape(inner) for j in range(3)))]


def _proj(target: str, source: str, d: int, heads: int, dh: int) -> list[Rule]:
  """torch Linear(heads * dh, d) <-> DenseGeneral kernel (heads, dh, d) and bias (d,)."""
  return [Rule(f"{target}/kernel", (f"{source}.weight",), ((d, heads * dh),),
               fwd=lambda w: w.T.reshape(heads, dh, d),
               inv=lambda k: (k.reshape(heads * dh, d).T,)),
          common.same(f"{target}/bias", f"{source}.bias", (d,))]


def _norm(target: str, source: str, kind: str | None, dh: int) -> list[Rule]:
  """A per-head q/k norm: RMSNorm weight -> scale; LayerNorm weight, bias -> scale,
  bias; fp32_layer_norm and none have no tensors."""
  if kind == "rms_norm":
    return [common.same(f"{target}/scale", f"{source}.weight", (dh,))]
  if kind == "layer_norm":
    return [common.same(f"{target}/scale", f"{source}.weight", (dh,)),
            common.same(f"{target}/bias", f"{source}.bias", (dh,))]
  return []


def key_table(model: MMDiT) -> list[Rule]:
  """The explicit rules between diffusers' tensor names and our parameter paths."""
  d, heads, dh, p = model.hidden_size, model.num_heads, model.head_dim, model.patch_size
  qk = qk_norm_type(model.qk_norm)
  lin = common.linear
  rules = common.conv2d("x_embedder", "pos_embed.proj", model.in_channels, d, p)
  rules += lin("t_embedder/mlp_0", "time_text_embed.timestep_embedder.linear_1", FREQ_DIM, d)
  rules += lin("t_embedder/mlp_2", "time_text_embed.timestep_embedder.linear_2", d, d)
  rules += lin("pooled_embedder/mlp_0", "time_text_embed.text_embedder.linear_1",
               model.pooled_dim, d)
  rules += lin("pooled_embedder/mlp_2", "time_text_embed.text_embedder.linear_2", d, d)
  rules += lin("context_embedder", "context_embedder", model.context_dim, d)
  for i in range(model.depth):
    b, s = f"blocks_{i}", f"transformer_blocks.{i}"
    last, dual = i == model.depth - 1, i in model.dual_attention_layers
    rules += lin(f"{b}/x_adaLN_modulation", f"{s}.norm1.linear", d, (9 if dual else 6) * d)
    rules += lin(f"{b}/context_adaLN_modulation", f"{s}.norm1_context.linear", d,
                 (2 if last else 6) * d)
    rules += _qkv(f"{b}/attn/qkv", tuple(f"{s}.attn.to_{c}" for c in "qkv"), d, heads, dh)
    rules += _qkv(f"{b}/attn/context_qkv",
                  tuple(f"{s}.attn.add_{c}_proj" for c in "qkv"), d, heads, dh)
    rules += _proj(f"{b}/attn/proj", f"{s}.attn.to_out.0", d, heads, dh)
    rules += _norm(f"{b}/attn/q_norm", f"{s}.attn.norm_q", qk, dh)
    rules += _norm(f"{b}/attn/k_norm", f"{s}.attn.norm_k", qk, dh)
    rules += _norm(f"{b}/attn/context_q_norm", f"{s}.attn.norm_added_q", qk, dh)
    rules += _norm(f"{b}/attn/context_k_norm", f"{s}.attn.norm_added_k", qk, dh)
    if not last:
      rules += _proj(f"{b}/attn/context_proj", f"{s}.attn.to_add_out", d, heads, dh)
    if dual:
      rules += _qkv(f"{b}/attn2/qkv", tuple(f"{s}.attn2.to_{c}" for c in "qkv"), d, heads, dh)
      rules += _proj(f"{b}/attn2/proj", f"{s}.attn2.to_out.0", d, heads, dh)
      rules += _norm(f"{b}/attn2/q_norm", f"{s}.attn2.norm_q", qk, dh)
      rules += _norm(f"{b}/attn2/k_norm", f"{s}.attn2.norm_k", qk, dh)
    rules += lin(f"{b}/mlp/fc1", f"{s}.ff.net.0.proj", d, 4 * d)
    rules += lin(f"{b}/mlp/fc2", f"{s}.ff.net.2", 4 * d, d)
    if not last:
      rules += lin(f"{b}/context_mlp/fc1", f"{s}.ff_context.net.0.proj", d, 4 * d)
      rules += lin(f"{b}/context_mlp/fc2", f"{s}.ff_context.net.2", 4 * d, d)
  rules += lin("final_layer/adaLN_modulation", "norm_out.linear", d, 2 * d)
  rules += lin("final_layer/linear", "proj_out", d, p * p * model.output_channels)
  return rules


def _pos_grid(model: MMDiT) -> np.ndarray:
  """diffusers' stored position buffer (1, max², hidden) for a pos_embed_max_size model."""
  size = model.pos_embed_max_size
  return sd3_pos_embed(model.hidden_size, size, size, model.input_size // model.patch_size,
                       size)[None]


def _check_pos_embed(tensors: Mapping, model: MMDiT, what: str) -> None:
  """The stored position grid (if the config has one) equals ours to its precision."""
  if model.pos_embed_max_size is None:
    return
  check(POS_EMBED in tensors, f"{what}: missing {POS_EMBED} (pos_embed_max_size is "
        f"{model.pos_embed_max_size})")
  stored = np.asarray(tensors[POS_EMBED])
  ours = _pos_grid(model)
  check(stored.shape == ours.shape,
        f"{what}: {POS_EMBED} has shape {stored.shape}, expected {ours.shape}")
  # Rounding to the stored dtype (float16 / bfloat16 checkpoints) moves |v| <= 1 by at
  # most eps / 2; float32 grids agree with ours to ~1e-6.
  eps = float(ml_dtypes.finfo(stored.dtype).eps)
  err = float(np.max(np.abs(stored.astype(np.float32) - ours)))
  check(err <= max(eps, 1e-5),
        f"{what}: the stored position grid {POS_EMBED} differs from the sin-cos grid ldm_jax "
        f"computes by up to {err:.3g}; ldm_jax cannot load a model with a different grid")


def from_diffusers(source, dtype=np.float32, *, variant: str | None = None
                   ) -> tuple[dict, dict]:
  """A diffusers SD3Transformer2DModel -> (ldm_jax params, MMDiT kwargs).

  Args:
    source: a folder (config.json + diffusion_pytorch_model[.variant].safetensors or
      its shards with the index json), or a (flat {name: array}, config dict) pair.
    dtype: dtype of the returned arrays (None keeps the stored dtype).
    variant: weight variant of a folder, e.g. "fp16"; by default the plain file, else
      the fp16 one if that is all the folder has.
  Returns:
    (params, kwargs): `MMDiT(**kwargs).apply({"params": params}, ...)`.
  Raises:
    UserError naming every missing, unused or mis-shaped tensor, an unsupported
    config, or a stored position grid that differs from ours.
  """
  if isinstance(source, (str, os.PathLike)):
    folder = os.fspath(source)
    config = common.read_json(os.path.join(folder, "config.json"))
    if variant is None and not any(os.path.isfile(os.path.join(folder, n)) for n in (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.safetensors.index.json")):
      if any(os.path.isfile(os.path.join(folder, f"diffusion_pytorch_model.fp16.{n}"))
             for n in ("safetensors", "safetensors.index.json")):
        variant = "fp16"
    tensors, what = common.load_safetensors(folder, variant=variant), f"diffusers SD3 {folder}"
  else:
    check(isinstance(source, tuple) and len(source) == 2,
          "from_diffusers: source must be a folder or a (tensors dict, config dict) pair")
    tensors, config = source
    what = "diffusers SD3 tensors"
  kwargs = config_from_diffusers(config)
  model = _model(kwargs)
  _check_pos_embed(tensors, model, what)
  params = common.convert_tensors(tensors, key_table(model), what=what, ignore=(POS_EMBED,),
                                  dtype=dtype)
  return params, kwargs


def to_diffusers(params, kwargs: Mapping, folder: str) -> None:
  """Writes config.json + diffusion_pytorch_model.safetensors (float32) that
  `SD3Transformer2DModel.from_pretrained(folder)` loads.

  Raises:
    UserError if `params` do not match `kwargs` exactly.
  """
  model = _model(kwargs)
  cfg = diffusers_config(kwargs)
  tensors = common.export_tensors(params, key_table(model), what="MMDiT params")
  if model.pos_embed_max_size is not None:
    tensors[POS_EMBED] = _pos_grid(model)
  os.makedirs(folder, exist_ok=True)
  common.write_json(cfg, os.path.join(folder, "config.json"))
  common.save_safetensors(tensors, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
