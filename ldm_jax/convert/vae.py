"""diffusers `AutoencoderKL` / `VQModel` <-> ldm_jax `AutoencoderKL` / `VQModel`.

A diffusers autoencoder folder holds config.json (`_class_name` "AutoencoderKL" or
"VQModel") and diffusion_pytorch_model[.variant].safetensors (or shards + index).
The key table below names every tensor: ResNets (norm1, conv1, norm2, conv2,
conv_shortcut), attention (group_norm, to_q, to_k, to_v, to_out.0 — torch Linear
(out, in) <-> Dense (in, out)), down/up samplers (`downsamplers.0.conv` <->
`downsample`, `upsamplers.0.conv` <-> `upsample`), GroupNorm weight <-> scale,
Conv2d OIHW <-> HWIO. `ldm_jax.convert.common` enforces it strictly both ways.

Our config is a dict of the model's fields plus `kind` ("kl" | "vq");
`ldm_jax.models.vae.make(config)` builds the module.

Usage:
  params, config = from_diffusers("stable-diffusion-v1-5/vae")
  model = vae.make(config); posterior = model.apply({"params": params}, x, method="encode")
  state_dict, diffusers_config = to_diffusers(params, config, folder="out/vae")
"""

import os
from typing import Mapping

import numpy as np

from ldm_jax.convert import common
from ldm_jax.convert.common import Rule
from ldm_jax.errors import check
from ldm_jax.models import vae

DIFFUSERS_CLASSES = {"AutoencoderKL": "kl", "VQModel": "vq"}
_DOWN = {False: "DownEncoderBlock2D", True: "AttnDownEncoderBlock2D"}
_UP = {False: "UpDecoderBlock2D", True: "AttnUpDecoderBlock2D"}


def _norm(target: str, source: str, channels: int) -> list[Rule]:
  """torch GroupNorm (weight, bias) <-> Flax GroupNorm (scale, bias)."""
  return [common.same(f"{target}/scale", f"{source}.weight", (channels,)),
          common.same(f"{target}/bias", f"{source}.bias", (channels,))]


def _resnet(target: str, source: str, c_in: int, c_out: int) -> list[Rule]:
  rules = _norm(f"{target}/norm1", f"{source}.norm1", c_in)
  rules += common.conv2d(f"{target}/conv1", f"{source}.conv1", c_in, c_out, 3)
  rules += _norm(f"{target}/norm2", f"{source}.norm2", c_out)
  rules += common.conv2d(f"{target}/conv2", f"{source}.conv2", c_out, c_out, 3)
  if c_in != c_out:
    rules += common.conv2d(f"{target}/conv_shortcut", f"{source}.conv_shortcut", c_in, c_out, 1)
  return rules


def _attention(target: str, source: str, channels: int) -> list[Rule]:
  rules = _norm(f"{target}/group_norm", f"{source}.group_norm", channels)
  for ours, theirs in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"),
                       ("to_out", "to_out.0")):
    rules += common.linear(f"{target}/{ours}", f"{source}.{theirs}", channels, channels)
  return rules


def _mid(target: str, source: str, channels: int, attention: bool) -> list[Rule]:
  rules = _resnet(f"{target}/resnets_0", f"{source}.resnets.0", channels, channels)
  if attention:
    rules += _attention(f"{target}/attentions_0", f"{source}.attentions.0", channels)
  return rules + _resnet(f"{target}/resnets_1", f"{source}.resnets.1", channels, channels)


def key_table(config: Mapping) -> list[Rule]:
  """The explicit rules for the autoencoder `config` (ours, with `kind`)."""
  model = vae.make(config)
  is_vq = isinstance(model, vae.VQModel)
  widths, levels = tuple(model.block_out_channels), len(model.block_out_channels)
  layers, attn_levels = model.layers_per_block, tuple(model.attention_levels)
  latent = model.latent_channels
  moments = latent if is_vq else 2 * latent

  rules = common.conv2d("encoder/conv_in", "encoder.conv_in", model.in_channels, widths[0], 3)
  prev = widths[0]
  for i, width in enumerate(widths):
    t, s = f"encoder/down_blocks_{i}", f"encoder.down_blocks.{i}"
    for j in range(layers):
      rules += _resnet(f"{t}/resnets_{j}", f"{s}.resnets.{j}", prev if j == 0 else width, width)
      if i in attn_levels:
        rules += _attention(f"{t}/attentions_{j}", f"{s}.attentions.{j}", width)
    if i < levels - 1:
      rules += common.conv2d(f"{t}/downsample", f"{s}.downsamplers.0.conv", width, width, 3)
    prev = width
  rules += _mid("encoder/mid_block", "encoder.mid_block", widths[-1], model.mid_attention)
  rules += _norm("encoder/conv_norm_out", "encoder.conv_norm_out", widths[-1])
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
  rules += _mid("decoder/mid_block", "decoder.mid_block", widths[-1], model.mid_attention)
  prev = widths[-1]
  for i, width in enumerate(reversed(widths)):
    t, s = f"decoder/up_blocks_{i}", f"decoder.up_blocks.{i}"
    for j in range(layers + 1):
      rules += _resnet(f"{t}/resnets_{j}", f"{s}.resnets.{j}", prev if j == 0 else width, width)
      if levels - 1 - i in attn_levels:
        rules += _attention(f"{t}/attentions_{j}", f"{s}.attentions.{j}", width)
    if i < levels - 1:
      rules += common.conv2d(f"{t}/upsample", f"{s}.upsamplers.0.conv", width, width, 3)
    prev = width
  rules += _norm("decoder/conv_norm_out", "decoder.conv_norm_out", widths[0])
  rules += common.conv2d("decoder/conv_out", "decoder.conv_out", widths[0], model.out_channels,
                         3)
  return rules


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
  for key in ("latents_mean", "latents_std"):
    check(cfg.get(key) is None, f"{what}: per-channel {key} is not supported (only scalar "
          "scaling_factor / shift_factor); valid: null")
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
  tensors = {k: (v.detach().cpu().float().numpy() if hasattr(v, "detach") else np.asarray(v))
             for k, v in state_dict.items()}
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
  cfg = config_to_diffusers(config, sample_size=sample_size)
  common.check_tree_matches(params, expected_params(config), what="autoencoder params")
  tensors = common.export_tensors(params, key_table(config), what="autoencoder params")
  if folder is not None:
    os.makedirs(folder, exist_ok=True)
    common.write_json(cfg, os.path.join(folder, "config.json"))
    common.save_safetensors(tensors, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  return tensors, cfg
