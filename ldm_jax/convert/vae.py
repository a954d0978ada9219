"""Autoencoder checkpoints <-> ldm_jax `AutoencoderKL` / `VQModel`, in two layouts:
diffusers folders and the original CompVis LDM / Stable Diffusion single files.

diffusers. A diffusers autoencoder folder holds config.json (`_class_name`
"AutoencoderKL" or "VQModel") and diffusion_pytorch_model[.variant].safetensors (or
shards + index).
The key table below names every tensor: ResNets (norm1, conv1, norm2, conv2,
conv_shortcut), attention (group_norm, to_q, to_k, to_v, to_out.0 — torch Linear
(out, in) <-> Dense (in, out)), down/up samplers (`downsamplers.0.conv` <->
`downsample`, `upsamplers.0.conv` <-> `upsample`), GroupNorm weight <-> scale,
Conv2d OIHW <-> HWIO. `ldm_jax.convert.common` enforces it strictly both ways.

LDM / SD. CompVis latent-diffusion, stable-diffusion, SGM (SDXL) and SD3 single-file
checkpoints and standalone VAE files (e.g. vae-ft-mse-840000-ema-pruned) use the
layout of `ldm.modules.diffusionmodules.model` / taming-transformers (`LDM_LAYOUT`):
`encoder.down.{i}.block.{j}.*`, `encoder.down.{i}.attn.{j}.{norm,q,k,v,proj_out}`
(q/k/v/proj_out are 1x1 Conv2d weights (C, C, 1, 1)), `encoder.down.{i}.downsample.conv`,
`encoder.mid.{block_1,attn_1,block_2}`, `encoder.norm_out`, `nin_shortcut` for
width-changing residuals, `decoder.up.{i}.*` with i the resolution level (0 = full
resolution, the REVERSE of diffusers' up_blocks order), `decoder.up.{i}.upsample.conv`,
`quant_conv`, `post_quant_conv` and, for VQ models, `quantize.embedding.weight`. Full
pipeline checkpoints keep the autoencoder under `first_stage_model.` (see
`split_ldm_state_dict` for the prefix rules). The architecture is not stored in
these files: it comes from a variant name of `vae.VARIANTS` or a config dict.

Our config is a dict of the model's fields plus `kind` ("kl" | "vq");
`ldm_jax.models.vae.make(config)` builds the module.

Usage:
  params, config = from_diffusers("stable-diffusion-v1-5/vae")
  model = vae.make(config); posterior = model.apply({"params": params}, x, method="encode")
  state_dict, diffusers_config = to_diffusers(params, config, folder="out/vae")
  params, config = from_ldm_checkpoint("v1-5-pruned-emaonly.safetensors", "sd")
  to_ldm_checkpoint(params, config, "out/vae.safetensors")
"""

import dataclasses
import logging
import os
from typing import Mapping

import numpy as np

from ldm_jax.convert import common
from ldm_jax.convert.common import Rule
from ldm_jax.errors import UserError, check
from ldm_jax.models import vae

logger = logging.getLogger("ldm_jax")

DIFFUSERS_CLASSES = {"AutoencoderKL": "kl", "VQModel": "vq"}
_DOWN = {False: "DownEncoderBlock2D", True: "AttnDownEncoderBlock2D"}
_UP = {False: "UpDecoderBlock2D", True: "AttnUpDecoderBlock2D"}


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one checkpoint format names the autoencoder's tensors (`{i}`: resolution
  level in that format's own order, `{j}`: block within it).

  Attributes:
    down / up: encoder / decoder level prefixes.
    up_reversed: the format numbers decoder levels from full resolution (LDM's
      `up.{i}`), not from the lowest one (diffusers' `up_blocks.{i}`, ours).
    resnet / attention: block names inside a level.
    downsample / upsample: the resampling conv inside a level.
    mid_resnets / mid_attention: the mid block's parts.
    norm_out / shortcut: final GroupNorm; 1x1 conv on a width-changing residual.
    attention_parts: names of (norm, q, k, v, out) inside an attention block.
    attention_convs: q/k/v/out are 1x1 Conv2d (C, C, 1, 1), not Linear (C, C).
  """
  down: str
  up: str
  up_reversed: bool
  resnet: str
  attention: str
  downsample: str
  upsample: str
  mid_resnets: tuple[str, str]
  mid_attention: str
  norm_out: str
  shortcut: str
  attention_parts: tuple[str, str, str, str, str]
  attention_convs: bool


DIFFUSERS_LAYOUT = Layout(
    down="down_blocks.{i}", up="up_blocks.{i}", up_reversed=False, resnet="resnets.{j}",
    attention="attentions.{j}", downsample="downsamplers.0.conv", upsample="upsamplers.0.conv",
    mid_resnets=("mid_block.resnets.0", "mid_block.resnets.1"),
    mid_attention="mid_block.attentions.0", norm_out="conv_norm_out", shortcut="conv_shortcut",
    attention_parts=("group_norm", "to_q", "to_k", "to_v", "to_out.0"), attention_convs=False)
# CompVis latent-diffusion / stable-diffusion / SGM (ldm.modules.diffusionmodules.model and
# taming-transformers): decoder `up.{i}` is level i (0 = full resolution).
LDM_LAYOUT = Layout(
    down="down.{i}", up="up.{i}", up_reversed=True, resnet="block.{j}", attention="attn.{j}",
    downsample="downsample.conv", upsample="upsample.conv", mid_resnets=("mid.block_1",
                                                                          "mid.block_2"),
    mid_attention="mid.attn_1", norm_out="norm_out", shortcut="nin_shortcut",
    attention_parts=("norm", "q", "k", "v", "proj_out"), attention_convs=True)


def _norm(target: str, source: str, channels: int) -> list[Rule]:
  """torch GroupNorm (weight, bias) <-> Flax GroupNorm (scale, bias)."""
  return [common.same(f"{target}/scale", f"{source}.weight", (channels,)),
          common.same(f"{target}/bias", f"{source}.bias", (channels,))]


def _conv1x1_as_dense(prefix: str, source: str, channels: int) -> list[Rule]:
  """torch 1x1 `Conv2d` weight (out, in, 1, 1) <-> Flax `Dense` kernel (in, out)."""
  return [Rule(f"{prefix}/kernel", (f"{source}.weight",), ((channels, channels, 1, 1),),
               fwd=lambda w: w[:, :, 0, 0].T, inv=lambda k: (k.T[:, :, None, None],)),
          common.same(f"{prefix}/bias", f"{source}.bias", (channels,))]


def _resnet(layout: Layout, target: str, source: str, c_in: int, c_out: int) -> list[Rule]:
  rules = _norm(f"{target}/norm1", f"{source}.norm1", c_in)
  rules += common.conv2d(f"{target}/conv1", f"{source}.conv1", c_in, c_out, 3)
  rules += _norm(f"{target}/norm2", f"{source}.norm2", c_out)
  rules += common.conv2d(f"{target}/conv2", f"{source}.conv2", c_out, c_out, 3)
  if c_in != c_out:
    rules += common.conv2d(f"{target}/conv_shortcut", f"{source}.{layout.shortcut}", c_in,
                           c_out, 1)
  return rules


def _attention(layout: Layout, target: str, source: str, channels: int) -> list[Rule]:
  norm, *projections = layout.attention_parts
  rules = _norm(f"{target}/group_norm", f"{source}.{norm}", channels)
  for ours, theirs in zip(("to_q", "to_k", "to_v", "to_out"), projections):
    if layout.attention_convs:
      rules += _conv1x1_as_dense(f"{target}/{ours}", f"{source}.{theirs}", channels)
    else:
      rules += common.linear(f"{target}/{ours}", f"{source}.{theirs}", channels, channels)
  return rules


def _mid(layout: Layout, target: str, source: str, channels: int, attention: bool
         ) -> list[Rule]:
  first, second = layout.mid_resnets
  rules = _resnet(layout, f"{target}/resnets_0", f"{source}.{first}", channels, channels)
  if attention:
    rules += _attention(layout, f"{target}/attentions_0", f"{source}.{layout.mid_attention}",
                        channels)
  return rules + _resnet(layout, f"{target}/resnets_1", f"{source}.{second}", channels,
                         channels)


def layout_table(config: Mapping, layout: Layout) -> list[Rule]:
  """The explicit rules for the autoencoder `config` (ours, with `kind`) in `layout`."""
  model = vae.make(config)
  is_vq = isinstance(model, vae.VQModel)
  widths, levels = tuple(model.block_out_channels), len(model.block_out_channels)
  layers, attn_levels = model.layers_per_block, tuple(model.attention_levels)
  latent = model.latent_channels
  moments = latent if is_vq else 2 * latent

  rules = common.conv2d("encoder/conv_in", "encoder.conv_in", model.in_channels, widths[0], 3)
  prev = widths[0]
  for i, width in enumerate(widths):
    t, s = f"encoder/down_blocks_{i}", "encoder." + layout.down.format(i=i)
    for j in range(layers):
      rules += _resnet(layout, f"{t}/resnets_{j}", f"{s}.{layout.resnet.format(j=j)}",
                       prev if j == 0 else width, width)
      if i in attn_levels:
        rules += _attention(layout, f"{t}/attentions_{j}", f"{s}.{layout.attention.format(j=j)}",
                            width)
    if i < levels - 1:
      rules += common.conv2d(f"{t}/downsample", f"{s}.{layout.downsample}", width, width, 3)
    prev = width
  rules += _mid(layout, "encoder/mid_block", "encoder", widths[-1], model.mid_attention)
  rules += _norm("encoder/conv_norm_out", f"encoder.{layout.norm_out}", widths[-1])
  rules += common.conv2d("encoder/conv_out", "encoder.conv_out", widths[-1], moments, 3)

  if is_vq:
    rules += common.conv2d("quant_conv", "quant_conv", latent, model.embed_dim, 1)
    rules.append(common.same("quantize/embedding", "quantize.embedding.weight",
                             (model.num_embeddings, model.embed_dim)))
    rules += common.conv2d("post_quant_conv", "post_quant_conv", model.embed_dim, latent, 1)
  else:
    if model.use_quant_conv:
      rules += common.conv2d("quant_conv", "quant_conv", moments, moments, 1)
    if model.use_post_quant_conv:
      rules += common.conv2d("post_quant_conv", "post_quant_conv", latent, latent, 1)

  rules += common.conv2d("decoder/conv_in", "decoder.conv_in", latent, widths[-1], 3)
  rules += _mid(layout, "decoder/mid_block", "decoder", widths[-1], model.mid_attention)
  prev = widths[-1]
  for i, width in enumerate(reversed(widths)):
    level = levels - 1 - i  # resolution level; 0 = full resolution
    t = f"decoder/up_blocks_{i}"
    s = "decoder." + layout.up.format(i=level if layout.up_reversed else i)
    for j in range(layers + 1):
      rules += _resnet(layout, f"{t}/resnets_{j}", f"{s}.{layout.resnet.format(j=j)}",
                       prev if j == 0 else width, width)
      if level in attn_levels:
        rules += _attention(layout, f"{t}/attentions_{j}", f"{s}.{layout.attention.format(j=j)}",
                            width)
    if i < levels - 1:
      rules += common.conv2d(f"{t}/upsample", f"{s}.{layout.upsample}", width, width, 3)
    prev = width
  rules += _norm("decoder/conv_norm_out", f"decoder.{layout.norm_out}", widths[0])
  rules += common.conv2d("decoder/conv_out", "decoder.conv_out", widths[0], model.out_channels,
                         3)
  return rules


def key_table(config: Mapping) -> list[Rule]:
  """The explicit rules for the autoencoder `config` (ours, with `kind`), diffusers names."""
  return layout_table(config, DIFFUSERS_LAYOUT)


def ldm_key_table(config: Mapping) -> list[Rule]:
  """The explicit rules for the autoencoder `config` (ours, with `kind`), in the original
  CompVis LDM / Stable Diffusion / taming layout (no `first_stage_model.` prefix)."""
  return layout_table(config, LDM_LAYOUT)


def expected_params(config: Mapping):
  """Parameter shapes of `vae.make(config)` from `jax.eval_shape` (nothing allocated)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  model = vae.make(config)
  size = model.downsampling_factor
  x = jax.ShapeDtypeStruct((1, size, size, model.in_channels), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


def diffusers_to_config(cfg: Mapping) -> dict:
  """A diffusers AutoencoderKL / VQModel config.json dict -> our config (with `kind`).

  Raises:
    UserError for another `_class_name` (e.g. a DiT or UNet folder) or a setting
    ldm_jax's autoencoder does not have.
  """
  name = cfg.get("_class_name")
  check(name in DIFFUSERS_CLASSES,
        f"not a diffusers autoencoder config: _class_name {name!r}; valid: "
        f"{sorted(DIFFUSERS_CLASSES)} (point at the pipeline's vae/ or vqvae/ folder)")
  kind = DIFFUSERS_CLASSES[name]
  what = f"diffusers {name} config.json"
  widths = tuple(cfg.get("block_out_channels", (64,)))
  levels = len(widths)
  down = list(cfg.get("down_block_types", ["DownEncoderBlock2D"]))
  up = list(cfg.get("up_block_types", ["UpDecoderBlock2D"]))
  check(len(down) == levels and len(up) == levels,
        f"{what}: {len(down)} down and {len(up)} up block types for {levels} block_out_channels")
  bad = [b for b in down if b not in _DOWN.values()] + [b for b in up if b not in _UP.values()]
  check(not bad, f"{what}: block types {bad} not supported; valid: "
        f"{sorted(_DOWN.values()) + sorted(_UP.values())}")
  attn_levels = tuple(i for i, b in enumerate(down) if b == _DOWN[True])
  mirrored = [_UP[levels - 1 - i in attn_levels] for i in range(levels)]
  check(up == mirrored, f"{what}: up_block_types {up} do not mirror down_block_types {down} "
        f"(expected {mirrored})")
  check(cfg.get("act_fn", "silu") == "silu", f"{what}: act_fn {cfg.get('act_fn')!r} is not "
        "supported; valid: 'silu'")
  check(cfg.get("norm_type", "group") == "group", f"{what}: norm_type {cfg.get('norm_type')!r}"
        " is not supported; valid: 'group'")
  stats = [key for key in ("latents_mean", "latents_std") if cfg.get(key) is not None]
  if stats:  # pipeline-level normalisation (e.g. Playground); the weights do not depend on it
    logging.getLogger("ldm_jax").warning(
        "%s: %s ignored: ldm_jax's autoencoder applies the scalar scaling_factor / "
        "shift_factor only (diffusers' SD3 pipeline does the same)", what, stats)
  config = dict(kind=kind, in_channels=cfg.get("in_channels", 3),
                out_channels=cfg.get("out_channels", 3), block_out_channels=widths,
                layers_per_block=cfg.get("layers_per_block", 1),
                latent_channels=cfg.get("latent_channels", 3 if kind == "vq" else 4),
                norm_groups=cfg.get("norm_num_groups", 32),
                mid_attention=bool(cfg.get("mid_block_add_attention", True)),
                attention_levels=attn_levels,
                scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
                shift_factor=float(cfg.get("shift_factor") or 0.0))
  if kind == "vq":
    config.update(num_embeddings=cfg.get("num_vq_embeddings", 256),
                  embed_dim=cfg.get("vq_embed_dim") or config["latent_channels"])
  else:
    config.update(use_quant_conv=bool(cfg.get("use_quant_conv", True)),
                  use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)))
  return config


def config_to_diffusers(config: Mapping, *, sample_size: int = 256) -> dict:
  """Our config -> a diffusers config.json dict (`sample_size` only sets diffusers'
  tiling tile size)."""
  model = vae.make(config)
  levels = len(model.block_out_channels)
  attn = tuple(model.attention_levels)
  cfg = dict(in_channels=model.in_channels, out_channels=model.out_channels,
             down_block_types=[_DOWN[i in attn] for i in range(levels)],
             up_block_types=[_UP[levels - 1 - i in attn] for i in range(levels)],
             block_out_channels=list(model.block_out_channels),
             layers_per_block=model.layers_per_block, act_fn="silu",
             latent_channels=model.latent_channels, norm_num_groups=model.norm_groups,
             sample_size=sample_size, scaling_factor=model.scaling_factor,
             mid_block_add_attention=model.mid_attention)
  if isinstance(model, vae.VQModel):
    check(model.beta == 0.25, f"diffusers' VQModel has commitment beta 0.25, not {model.beta}")
    cfg.update(_class_name="VQModel", num_vq_embeddings=model.num_embeddings,
               vq_embed_dim=model.embed_dim, norm_type="group")
    check(model.shift_factor == 0.0, "diffusers' VQModel has no shift_factor; these params "
          f"use {model.shift_factor}")
  else:
    cfg.update(_class_name="AutoencoderKL", use_quant_conv=model.use_quant_conv,
               use_post_quant_conv=model.use_post_quant_conv,
               shift_factor=model.shift_factor or None)
  return cfg


def from_diffusers_state_dict(state_dict: Mapping[str, np.ndarray], diffusers_config: Mapping,
                              *, what: str = "diffusers autoencoder") -> tuple[dict, dict]:
  """A diffusers state dict (numpy or torch tensors) and its config dict ->
  (ldm_jax params, our config).

  Raises:
    UserError naming every missing, unused or mis-shaped tensor, or an unsupported
    config.
  """
  config = diffusers_to_config(diffusers_config)
  ldm_like = sorted(k for k in state_dict if _looks_ldm(k))
  check(not ldm_like, f"{what}: this looks like an original LDM / Stable Diffusion "
        f"(CompVis) state dict (keys such as {ldm_like[:2]}), not a diffusers one; use "
        "ldm_jax.convert.vae.from_ldm_state_dict / from_ldm_checkpoint")
  tensors = {k: _numpy(v) for k, v in state_dict.items()}
  params = common.convert_tensors(tensors, key_table(config), what=what)
  common.check_tree_matches(params, expected_params(config), what=what)
  return params, config


def from_diffusers(folder: str, *, variant: str | None = None) -> tuple[dict, dict]:
  """A diffusers AutoencoderKL / VQModel folder -> (ldm_jax params, our config).

  Args:
    folder: holds config.json and diffusion_pytorch_model[.variant].safetensors
      (or shards plus index json); e.g. a pipeline's `vae/`.
    variant: weight variant such as "fp16".
  """
  folder = os.fspath(folder)
  _check_diffusers_folder(folder)
  cfg = common.read_json(os.path.join(folder, "config.json"))
  what = f"diffusers {cfg.get('_class_name')} {folder}"
  diffusers_to_config(cfg)  # the wrong kind of folder fails before reading weights
  return from_diffusers_state_dict(common.load_safetensors(folder, variant=variant), cfg,
                                   what=what)


def to_diffusers(params, config: Mapping, folder: str | None = None, *,
                 sample_size: int = 256) -> tuple[dict[str, np.ndarray], dict]:
  """ldm_jax autoencoder params -> (diffusers state dict of numpy arrays, config dict).

  With `folder`, also writes config.json + diffusion_pytorch_model.safetensors there,
  which `AutoencoderKL.from_pretrained(folder)` (or `VQModel`) loads.
  """
  params, config = vae.inference_weights(params, config)  # an EMA codebook's averages: dropped
  cfg = config_to_diffusers(config, sample_size=sample_size)
  common.check_tree_matches(params, expected_params(config), what="autoencoder params")
  tensors = common.export_tensors(params, key_table(config), what="autoencoder params")
  if folder is not None:
    os.makedirs(folder, exist_ok=True)
    common.write_json(cfg, os.path.join(folder, "config.json"))
    common.save_safetensors(tensors, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  return tensors, cfg


# --- Original LDM / Stable Diffusion single-file layout ---------------------------------

VAE_PREFIXES = ("first_stage_model.", "vae.")  # where pipeline checkpoints keep the VAE
TRAINING_ONLY = ("loss.", "model_ema.")  # LDM autoencoder training checkpoints, no prefix
_DIFFUSERS_MARKERS = (".down_blocks.", ".up_blocks.", ".mid_block.", ".conv_norm_out.")
_LDM_MARKERS = (".down.", ".up.", ".mid.block_", ".mid.attn_", ".norm_out.", "first_stage_model.")
_MAX_PROBLEMS = 12  # shown in a does-not-fit error; the rest are counted


def _numpy(v) -> np.ndarray:
  """A torch tensor (any float dtype) or array-like as a numpy array."""
  return v.detach().cpu().float().numpy() if hasattr(v, "detach") else np.asarray(v)


def _looks_ldm(key: str) -> bool:
  key = "." + key
  return any(m in key for m in _LDM_MARKERS) and not any(m in key for m in _DIFFUSERS_MARKERS)


def _looks_diffusers(key: str) -> bool:
  return any(m in "." + key for m in _DIFFUSERS_MARKERS)


def _check_diffusers_folder(folder: str) -> None:
  """Clear errors for the wrong kind of path given to `from_diffusers`."""
  check(not os.path.isfile(folder), f"{folder} is a file; from_diffusers takes a diffusers "
        "autoencoder folder (config.json + diffusion_pytorch_model.safetensors). For a "
        "single-file LDM / Stable Diffusion checkpoint use from_ldm_checkpoint(path, variant)")
  index = os.path.join(folder, "model_index.json")
  if not os.path.isfile(os.path.join(folder, "config.json")) and os.path.isfile(index):
    components = common.read_json(index)
    vaes = sorted(name for name, value in components.items()
                  if isinstance(value, list) and len(value) == 2
                  and value[1] in DIFFUSERS_CLASSES)
    raise UserError(f"{folder} is a diffusers pipeline folder (model_index.json), not an "
                    "autoencoder folder; point at its "
                    + (f"{vaes[0]}/ subfolder ({os.path.join(folder, vaes[0])})" if vaes else
                       "vae/ subfolder (model_index.json names no AutoencoderKL / VQModel)"))


def _groups(keys) -> dict[str, int]:
  """Key counts by leading module ('model.diffusion_model', 'cond_stage_model', 'loss')."""
  out: dict[str, int] = {}
  for key in keys:
    parts = key.split(".")
    group = ".".join(parts[:2]) if parts[0] == "model" and len(parts) > 2 \
        else parts[0]
    out[group] = out.get(group, 0) + 1
  return dict(sorted(out.items()))


def split_ldm_state_dict(state_dict: Mapping, prefix: str | None = None
                         ) -> tuple[dict, str, dict[str, int]]:
  """Picks the autoencoder's tensors out of an LDM-layout checkpoint.

  Prefix rules: with `prefix=None` it is detected: `first_stage_model.` (SD 1/2,
  SDXL, SD3 and LDM pipeline checkpoints) or `vae.` if keys start with it, else ''
  (standalone VAE files) if there are `encoder.*` / `decoder.*` keys. With a
  prefix, keys outside it (`model.diffusion_model.*`, `cond_stage_model.*`,
  `conditioner.*`, `text_encoders.*`, ...) are ignored; with '' only the training
  extras `loss.*` (LPIPS / discriminator) and `model_ema.*` (LitEma copies, not
  loaded) are. Every other key must be an autoencoder tensor (checked by the caller).

  Args:
    state_dict: {name: tensor} (torch, numpy or lazily loaded).
    prefix: '' / 'first_stage_model.' / ... or None to detect.
  Returns:
    (autoencoder tensors with the prefix removed, prefix, {ignored key group: count}).
  Raises:
    UserError: no autoencoder tensors (e.g. a UNet-only checkpoint), an ambiguous
      prefix, or a diffusers-layout state dict.
  """
  keys = list(state_dict)
  if prefix is None:
    found = [p for p in VAE_PREFIXES if any(k.startswith(p) for k in keys)]
    check(len(found) <= 1, f"LDM checkpoint: autoencoder tensors under several prefixes "
          f"{found}; pass prefix= to choose one")
    if found:
      prefix = found[0]
    else:
      check(any(k.startswith(("encoder.", "decoder.")) for k in keys),
            "LDM checkpoint: no autoencoder tensors (no keys under "
            f"{' / '.join(VAE_PREFIXES)} nor encoder.* / decoder.*); its key groups are "
            f"{_groups(keys)}. A UNet / denoiser-only checkpoint? The autoencoder then "
            "ships separately (e.g. vae-ft-mse-840000-ema-pruned, or a diffusers vae/ folder)")
      prefix = ""
  check(prefix == "" or prefix.endswith("."), f"LDM checkpoint: prefix {prefix!r} must be '' "
        "or end with '.' (e.g. 'first_stage_model.')")
  if prefix:
    inside = [k for k in keys if k.startswith(prefix)]
  else:
    inside = [k for k in keys if not k.startswith(TRAINING_ONLY)]
  check(inside, f"LDM checkpoint: no keys under prefix {prefix!r}; its key groups are "
        f"{_groups(keys)}")
  diffusers_keys = [k for k in inside if _looks_diffusers(k)]
  check(not diffusers_keys, "this looks like a diffusers AutoencoderKL / VQModel state dict "
        f"(keys such as {diffusers_keys[:1]}), not the LDM layout; use "
        "ldm_jax.convert.vae.from_diffusers_state_dict, or from_diffusers for a folder")
  inside_set = set(inside)
  ignored = _groups(k for k in keys if k not in inside_set)
  return {k[len(prefix):]: state_dict[k] for k in inside}, prefix, ignored


def resolve_config(config_or_variant) -> dict:
  """A variant name of `vae.VARIANTS` or a config dict (with `kind`) -> config dict."""
  if isinstance(config_or_variant, str):
    check(config_or_variant in vae.VARIANTS, f"unknown autoencoder variant "
          f"{config_or_variant!r}; valid: {sorted(vae.VARIANTS)} (or pass a config dict)")
    return dict(vae.VARIANTS[config_or_variant])
  check(isinstance(config_or_variant, Mapping), "autoencoder config: expected a variant name "
        f"or a dict, got {type(config_or_variant).__name__}")
  config = dict(config_or_variant)
  vae.make(config)  # validates kind and fields
  return config


_STRUCTURE = ("kind", "in_channels", "out_channels", "block_out_channels", "layers_per_block",
              "latent_channels", "mid_attention", "attention_levels", "use_quant_conv",
              "use_post_quant_conv", "embed_dim", "num_embeddings")


def _structure(config: Mapping) -> dict:
  model = vae.make(config)
  out = {k: getattr(model, k) for k in _STRUCTURE[1:] if hasattr(model, k)}
  out = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in out.items()}
  return dict(kind=config["kind"], **out)


def infer_ldm_structure(tensors: Mapping) -> dict:
  """The architecture an LDM-layout autoencoder's tensor shapes show (prefix removed):
  the `_STRUCTURE` fields of a config; norm groups and latent scaling are not visible.

  Raises:
    UserError if a tensor needed to read it is absent.
  """
  def shape(key):
    check(key in tensors, f"LDM checkpoint: {key} missing (cannot read the architecture)")
    return tuple(np.shape(tensors[key]))

  levels = 1 + max((int(k.split(".")[2]) for k in tensors if k.startswith("encoder.down.")),
                   default=-1)
  check(levels > 0, "LDM checkpoint: no encoder.down.* tensors")
  widths = tuple(shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(levels))
  layers = len({k.split(".")[4] for k in tensors if k.startswith("encoder.down.0.block.")})
  out = dict(kind="vq" if "quantize.embedding.weight" in tensors else "kl",
             in_channels=shape("encoder.conv_in.weight")[1],
             out_channels=shape("decoder.conv_out.weight")[0], block_out_channels=widths,
             layers_per_block=layers, latent_channels=shape("decoder.conv_in.weight")[1],
             mid_attention="encoder.mid.attn_1.q.weight" in tensors,
             attention_levels=tuple(i for i in range(levels)
                                    if f"encoder.down.{i}.attn.0.q.weight" in tensors))
  if out["kind"] == "vq":
    out["num_embeddings"], out["embed_dim"] = shape("quantize.embedding.weight")
  else:
    out.update(use_quant_conv="quant_conv.weight" in tensors,
               use_post_quant_conv="post_quant_conv.weight" in tensors)
  return out


def _fit_problems(tensors: Mapping, rules: list[Rule]) -> list[str]:
  problems, used = [], set()
  for r in rules:
    for name, shape in zip(r.sources, r.shapes):
      used.add(name)
      if name not in tensors:
        problems.append(f"missing: {name} (expected shape {shape})")
      elif tuple(np.shape(tensors[name])) != tuple(shape):
        problems.append(f"wrong shape: {name} is {tuple(np.shape(tensors[name]))}, "
                        f"expected {shape}")
  problems += [f"unused: {k} (shape {tuple(np.shape(tensors[k]))})"
               for k in sorted(set(tensors) - used)]
  return problems


def _misfit_message(what: str, config: Mapping, tensors: Mapping, problems: list[str]) -> str:
  shown = problems[:_MAX_PROBLEMS]
  more = len(problems) - len(shown)
  message = (f"{what} does not fit the autoencoder config {_structure(config)}: "
             f"{len(problems)} problem(s):\n  " + "\n  ".join(shown)
             + (f"\n  ... and {more} more" if more else ""))
  try:
    seen = infer_ldm_structure(tensors)
  except UserError:
    return message
  matches = sorted(name for name, row in vae.VARIANTS.items() if _structure(row) == seen)
  return (message + f"\nThe checkpoint's tensors show {seen}; " +
          (f"matching variants: {matches}" if matches else
           "no variant of vae.VARIANTS matches: pass a config dict"))


def from_ldm_state_dict(state_dict: Mapping, config, *, prefix: str | None = None,
                        what: str = "LDM autoencoder checkpoint") -> dict:
  """An LDM / Stable Diffusion layout state dict -> ldm_jax autoencoder params.

  Args:
    state_dict: {name: torch tensor or array}: a standalone VAE's, a full pipeline
      checkpoint's (autoencoder under `first_stage_model.`), or an LDM autoencoder
      training checkpoint's (with `loss.*` / `model_ema.*`).
    config: our config dict (with `kind`) or a variant name of `vae.VARIANTS`.
    prefix: where the autoencoder's keys are; None detects it (see
      `split_ldm_state_dict`). Keys outside it are ignored and their groups logged;
      every key under it must be used and every parameter covered.
    what: the checkpoint's name in error messages.
  Returns:
    Nested dict of float32 numpy arrays for `vae.make(config)`.
  Raises:
    UserError: the wrong kind of state dict, or tensors that do not fit `config`
      (the first mismatched keys / shapes named, with the variants they would fit).
  """
  config = resolve_config(config)
  tensors, prefix, ignored = split_ldm_state_dict(state_dict, prefix)
  if ignored:
    logger.info("%s: autoencoder under prefix %r; ignored keys outside it: %s", what, prefix,
                ", ".join(f"{g}.* ({n})" for g, n in ignored.items()))
  tensors = {k: _numpy(v) for k, v in tensors.items()}
  rules = ldm_key_table(config)
  problems = _fit_problems(tensors, rules)
  if problems:
    raise UserError(_misfit_message(what, config, tensors, problems))
  params = common.convert_tensors(tensors, rules, what=what)
  common.check_tree_matches(params, expected_params(config), what=what)
  return params


class _SafetensorsFile(Mapping):
  """Read-only {name: np.ndarray} view of a safetensors file that reads a tensor only
  when it is looked up (a full SD / SDXL file is GBs; the autoencoder ~330 MB)."""

  def __init__(self, path: str):
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    try:
      self._file = safe_open(path, framework="numpy")
      self._keys = list(self._file.keys())
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"cannot read safetensors file {path}: {e}") from e
    self._path, self._flax = path, None

  def __getitem__(self, key):
    if key not in self._keys:
      raise KeyError(key)
    try:
      return self._file.get_tensor(key)
    except TypeError:  # bfloat16 has no plain numpy dtype: read through jax / ml_dtypes
      from safetensors import safe_open  # pylint: disable=import-outside-toplevel
      if self._flax is None:
        self._flax = safe_open(self._path, framework="flax")
      return np.asarray(self._flax.get_tensor(key))

  def __iter__(self):
    return iter(self._keys)

  def __len__(self):
    return len(self._keys)


def read_ldm_checkpoint(path: str) -> Mapping:
  """{name: tensor} of a `.safetensors` (read lazily) or `.ckpt` / `.pt` / `.pth` file
  (`torch.load(weights_only=True)`; Lightning checkpoints' "state_dict" is used)."""
  path = os.fspath(path)
  check(os.path.isfile(path), f"{path}: no such checkpoint file"
        + (" (a folder: for a diffusers autoencoder folder use from_diffusers)"
           if os.path.isdir(path) else ""))
  if path.endswith(".safetensors"):
    return _SafetensorsFile(path)
  check(path.endswith((".ckpt", ".pt", ".pth", ".bin")), f"{path}: unknown checkpoint "
        "extension; valid: .safetensors, .ckpt, .pt, .pth, .bin")
  return common.load_torch_state_dict(path, prefer=("state_dict",))


def from_ldm_checkpoint(path: str, config_or_variant, *, prefix: str | None = None
                        ) -> tuple[dict, dict]:
  """An LDM / SD / SDXL / SD3 single-file checkpoint or standalone VAE file ->
  (ldm_jax params, our config).

  Args:
    path: `.safetensors`, or `.ckpt` / `.pt` / `.pth` (loaded with weights_only=True).
    config_or_variant: a variant name of `vae.VARIANTS` ("sd", "sdxl", "sd3", "kl-f4",
      "vq-f8", ...) or a config dict: these files do not record the architecture.
    prefix: see `split_ldm_state_dict`; None detects it.
  """
  config = resolve_config(config_or_variant)
  params = from_ldm_state_dict(read_ldm_checkpoint(path), config, prefix=prefix,
                               what=f"LDM autoencoder checkpoint {os.fspath(path)}")
  return params, config


def to_ldm_state_dict(params, config, *, prefix: str = "") -> dict[str, np.ndarray]:
  """ldm_jax autoencoder params -> LDM-layout {name: float32 numpy array}.

  Args:
    params: the params tree of `vae.make(config)`.
    config: our config dict or a variant name.
    prefix: prepended to every key, e.g. "first_stage_model." to merge into a full
      pipeline checkpoint; '' for a standalone VAE file.
  """
  config = resolve_config(config)
  params, config = vae.inference_weights(params, config)  # an EMA codebook's averages: dropped
  check(prefix == "" or prefix.endswith("."), f"prefix {prefix!r} must be '' or end with '.'")
  common.check_tree_matches(params, expected_params(config), what="autoencoder params")
  tensors = common.export_tensors(params, ldm_key_table(config), what="autoencoder params")
  return {prefix + k: v for k, v in tensors.items()}


def to_ldm_checkpoint(params, config, path: str, *, prefix: str = "") -> str:
  """Writes `to_ldm_state_dict(params, config, prefix=prefix)` as a `.safetensors` file
  (never overwrites an existing file); returns `path`."""
  path = os.fspath(path)
  check(path.endswith(".safetensors"), f"{path}: LDM checkpoints are written as "
        ".safetensors only")
  check(not os.path.exists(path), f"{path} exists; refusing to overwrite it")
  tensors = to_ldm_state_dict(params, config, prefix=prefix)
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  common.save_safetensors(tensors, path)
  return path
