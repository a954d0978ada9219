"""Autoencoders in the original CompVis LDM / Stable Diffusion single-file layout: our
export is converted to diffusers by diffusers' own single-file converter and must give
the same model; import inverts export exactly; prefixes of full checkpoints; and the
errors for the wrong kind of file or a config that does not fit."""

import logging
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

from ldm_jax.convert import common, vae as cvae  # noqa: E402
from ldm_jax.errors import UserError  # noqa: E402

TOL = 1e-5  # max |ours - ref| / max |ref|
# Three levels so that the reversed decoder numbering (LDM up.{i} vs diffusers
# up_blocks.{levels-1-i}) is exercised with a middle level that differs from both ends.
SD_LIKE = dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8,
               latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 3,
               up_block_types=("UpDecoderBlock2D",) * 3)
# Attention in the lowest-resolution level too (LDM attn_resolutions; vq-f8 style).
ATTN_KL = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
               latent_channels=4, down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
               up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"))
VQ_LIKE = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
               latent_channels=3, vq_embed_dim=4, num_vq_embeddings=32,
               down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
               up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"))


def _random(cls, cfg, seed):
  torch.manual_seed(seed)
  model = cls(**cfg)
  with torch.no_grad():  # norms / biases away from 1 / 0 so each mapping is tested
    for q in model.parameters():
      if q.ndim == 1:
        q.add_(0.1 * torch.randn_like(q))
  return model.eval()


def _ours(ref):
  return cvae.from_diffusers_state_dict(ref.state_dict(),
                                        dict(ref.config, _class_name=type(ref).__name__))


def _torch(state):
  return {k: torch.from_numpy(np.array(v)) for k, v in state.items()}


def _level_attention_to_diffusers(ldm, levels):
  """The per-level attention keys diffusers' convert_ldm_vae_checkpoint leaves alone,
  renamed by diffusers' own attention helper (LDM decoder up.{i} = up_blocks.{L-1-i})."""
  out = {}
  for coder, theirs, ours in [("encoder", "down.{i}.attn", "down_blocks.{i}.attentions"),
                              ("decoder", "up.{i}.attn", "up_blocks.{r}.attentions")]:
    for i in range(levels):
      old, new = theirs.format(i=i), ours.format(i=i, r=levels - 1 - i)
      keys = [k for k in ldm if k.startswith(f"{coder}.{old}.")]
      single_file_utils.update_vae_attentions_ldm_to_diffusers(
          keys, out, ldm, mapping={"old": old, "new": new})
  return out


def _outputs(model, x):
  with torch.no_grad():
    if isinstance(model, diffusers.VQModel):
      return [model(x).sample.numpy(), model.encode(x).latents.numpy()]
    dist = model.encode(x).latent_dist
    return [model(x).sample.numpy(), dist.mean.numpy(), dist.logvar.numpy()]


@pytest.mark.parametrize("name", ["sd-like", "attn-kl", "vq"])
def test_ldm_layout_is_what_diffusers_single_file_reads(name):
  cls = diffusers.VQModel if name == "vq" else diffusers.AutoencoderKL
  cfg = {"sd-like": SD_LIKE, "attn-kl": ATTN_KL, "vq": VQ_LIKE}[name]
  ref = _random(cls, cfg, seed=1)
  params, config = _ours(ref)
  ldm = _torch(cvae.to_ldm_state_dict(params, config, prefix="first_stage_model."))
  width = cfg["block_out_channels"][-1]  # LDM attention projections are 1x1 convs (C, C, 1, 1)
  for part in ("q", "k", "v", "proj_out"):  # (diffusers' converter would accept (C, C) too)
    assert ldm[f"first_stage_model.decoder.mid.attn_1.{part}.weight"].shape == (width, width, 1, 1)
  back = single_file_utils.convert_ldm_vae_checkpoint(ldm, dict(ref.config))
  levels = len(cfg["block_out_channels"])
  if config["attention_levels"]:  # not handled by diffusers' single-file converter
    unconverted = sorted(k for k in back if ".attn." in k)
    assert unconverted and all(".attentions." not in k for k in unconverted)
    for k in unconverted:
      back.pop(k)
    stripped = {k[len("first_stage_model."):]: v for k, v in ldm.items()}
    back.update(_level_attention_to_diffusers(stripped, levels))
  if name == "vq":  # convert_ldm_vae_checkpoint drops the codebook; taming's name for it
    assert "quantize.embedding.weight" not in back
    back["quantize.embedding.weight"] = ldm["first_stage_model.quantize.embedding.weight"]
  reference = ref.state_dict()
  assert sorted(back) == sorted(reference)
  for key, value in reference.items():  # bit-exact: the same tensors under the same names
    np.testing.assert_array_equal(back[key].numpy(), value.numpy(), err_msg=key)
  fresh = cls(**cfg).eval()
  fresh.load_state_dict(back, strict=True)
  x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32))
  errors = [float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
            for a, b in zip(_outputs(fresh, x), _outputs(ref, x))]
  print(f"{name}: {len(ldm)} LDM tensors; output rel errors {errors}")
  assert max(errors) <= TOL
  # ... and our import of the LDM layout inverts our export exactly.
  again = cvae.from_ldm_state_dict(ldm, config)
  flat, flat_again = common.flatten_params(params), common.flatten_params(again)
  assert sorted(flat) == sorted(flat_again)
  for key, value in flat.items():
    np.testing.assert_array_equal(flat_again[key], value, err_msg=key)


def test_vq_ldm_names_are_taming_names():
  params, config = _ours(_random(diffusers.VQModel, VQ_LIKE, seed=2))
  ldm = cvae.to_ldm_state_dict(params, config)
  expected = {  # taming-transformers / LDM module names (ldm.modules.diffusionmodules.model)
      "quantize.embedding.weight": (32, 4), "quant_conv.weight": (4, 3, 1, 1),
      "post_quant_conv.weight": (3, 4, 1, 1), "encoder.conv_out.weight": (3, 32, 3, 3),
      "encoder.down.0.downsample.conv.weight": (16, 16, 3, 3),
      "encoder.down.1.block.0.nin_shortcut.weight": (32, 16, 1, 1),
      "encoder.down.1.attn.0.q.weight": (32, 32, 1, 1),
      "encoder.down.1.attn.0.norm.weight": (32,), "encoder.mid.attn_1.proj_out.weight":
      (32, 32, 1, 1), "encoder.mid.block_2.conv2.weight": (32, 32, 3, 3),
      "encoder.norm_out.bias": (16 * 2,),
      "decoder.up.1.attn.1.proj_out.weight": (32, 32, 1, 1),  # level 1 = lowest resolution
      "decoder.up.1.block.1.conv1.weight": (32, 32, 3, 3),
      "decoder.up.1.upsample.conv.weight": (32, 32, 3, 3),
      "decoder.up.0.block.0.nin_shortcut.weight": (16, 32, 1, 1),  # full resolution
      "decoder.up.0.block.1.norm1.weight": (16,), "decoder.norm_out.weight": (16,)}
  for key, shape in expected.items():
    assert ldm[key].shape == shape, key
  assert not any("decoder.up.0.upsample" in k or "encoder.down.1.downsample" in k or
                 "attn" in k and (".down.0." in k or ".up.0." in k) for k in ldm)
  assert len(ldm) == len(common.flatten_params(params))


def _fake_full_checkpoint(vae_state):
  """A Stable-Diffusion-like single file: VAE under first_stage_model., plus others."""
  rng = np.random.default_rng(0)
  full = {f"first_stage_model.{k}": v for k, v in vae_state.items()}
  full.update({"model.diffusion_model.input_blocks.0.0.weight": rng.standard_normal((8, 4, 3, 3)),
               "model.diffusion_model.out.2.bias": rng.standard_normal(4),
               "cond_stage_model.transformer.text_model.final_layer_norm.weight": np.ones(8),
               "loss.logvar": np.zeros(()), "model_ema.decay": np.ones(()),
               "alphas_cumprod": np.linspace(1, 0, 10)})
  return {k: np.asarray(v, np.float32) for k, v in full.items()}


def test_prefixes_files_and_ignored_keys(tmp_path, caplog):
  params, config = _ours(_random(diffusers.AutoencoderKL, ATTN_KL, seed=3))
  vae_state = cvae.to_ldm_state_dict(params, config)
  flat = common.flatten_params(params)

  def same(p):
    got = common.flatten_params(p)
    assert sorted(got) == sorted(flat)
    for key, value in flat.items():
      np.testing.assert_array_equal(got[key], value, err_msg=key)

  full = _fake_full_checkpoint(vae_state)
  tensors, prefix, ignored = cvae.split_ldm_state_dict(full)
  assert prefix == "first_stage_model." and sorted(tensors) == sorted(vae_state)
  assert ignored == {"alphas_cumprod": 1, "cond_stage_model": 1, "loss": 1,
                     "model.diffusion_model": 2, "model_ema": 1}
  with caplog.at_level(logging.INFO, logger="ldm_jax"):
    same(cvae.from_ldm_state_dict(full, config))
  assert "ignored keys outside it: alphas_cumprod.* (1), cond_stage_model.* (1)" in caplog.text
  # Standalone VAE / LDM first-stage training checkpoint: no prefix; loss.* and
  # model_ema.* are the only keys allowed besides the autoencoder's.
  training = dict(vae_state, **{"loss.logvar": np.zeros(()),
                                "loss.discriminator.main.0.weight": np.zeros((4, 3, 4, 4)),
                                "model_ema.num_updates": np.zeros(())})
  assert cvae.split_ldm_state_dict(training)[1:] == ("", {"loss": 2, "model_ema": 1})
  same(cvae.from_ldm_state_dict(training, config))
  with pytest.raises(UserError, match=r"unused: model\.diffusion_model\.x \(shape \(3,\)\)"):
    cvae.from_ldm_state_dict(dict(vae_state, **{"model.diffusion_model.x": np.zeros(3)}), config)
  # Under the prefix, every key must be used.
  with pytest.raises(UserError, match=r"unused: loss\.logvar"):
    cvae.from_ldm_state_dict(dict(full, **{"first_stage_model.loss.logvar": np.zeros(())}),
                             config)
  # Files: safetensors (written with a prefix, read lazily), a Lightning-style .ckpt
  # with a top-level "state_dict", never overwriting.
  path = cvae.to_ldm_checkpoint(params, config, str(tmp_path / "out" / "vae.safetensors"),
                                prefix="first_stage_model.")
  loaded, config_back = cvae.from_ldm_checkpoint(path, config)
  assert config_back == config
  same(loaded)
  with pytest.raises(UserError, match="exists; refusing to overwrite"):
    cvae.to_ldm_checkpoint(params, config, path)
  ckpt = str(tmp_path / "last.ckpt")
  torch.save({"state_dict": _torch(full), "global_step": 7, "epoch": 1}, ckpt)
  same(cvae.from_ldm_checkpoint(ckpt, config)[0])
  # A variant name works in place of a config.
  tiny_cfg = cvae.config_to_diffusers(cvae.resolve_config("tiny-kl"))
  tiny_cfg.pop("_class_name")
  tiny_params, _ = _ours(_random(diffusers.AutoencoderKL, tiny_cfg, seed=4))
  cvae.to_ldm_checkpoint(tiny_params, "tiny-kl", str(tmp_path / "tiny.safetensors"))
  loaded, tiny_config = cvae.from_ldm_checkpoint(str(tmp_path / "tiny.safetensors"), "tiny-kl")
  assert tiny_config["norm_groups"] == 8
  assert common.flatten_params(loaded).keys() == common.flatten_params(tiny_params).keys()


def test_wrong_kind_errors(tmp_path):
  ref = _random(diffusers.AutoencoderKL, ATTN_KL, seed=5)
  params, config = _ours(ref)
  ldm = cvae.to_ldm_state_dict(params, config)
  with pytest.raises(UserError, match="this looks like a diffusers AutoencoderKL / VQModel state "
                                      "dict .*use ldm_jax.convert.vae.from_diffusers_state_dict"):
    cvae.from_ldm_state_dict(ref.state_dict(), config)
  with pytest.raises(UserError, match="looks like a diffusers"):  # a flattened pipeline
    cvae.from_ldm_state_dict({f"vae.{k}": v for k, v in ref.state_dict().items()}, config)
  unet_only = {"model.diffusion_model.input_blocks.0.0.weight": np.zeros((8, 4, 3, 3)),
               "model.diffusion_model.out.2.bias": np.zeros(4),
               "cond_stage_model.model.ln_final.weight": np.zeros(8)}
  with pytest.raises(UserError, match=r"no autoencoder tensors .*key groups are "
                                      r"\{'cond_stage_model': 1, 'model.diffusion_model': 2\}.*"
                                      "UNet / denoiser-only checkpoint"):
    cvae.from_ldm_state_dict(unet_only, config)
  with pytest.raises(UserError, match="looks like an original LDM / Stable Diffusion"):
    cvae.from_diffusers_state_dict(ldm, dict(ref.config, _class_name="AutoencoderKL"))
  # A checkpoint that does not fit the config: the first problems, then what it would fit.
  wrong = dict(config, latent_channels=8)
  with pytest.raises(UserError) as info:
    cvae.from_ldm_state_dict(ldm, wrong)
  message = str(info.value)
  print(message)
  assert "does not fit the autoencoder config" in message
  assert "wrong shape: encoder.conv_out.weight is (8, 32, 3, 3), expected (16, 32, 3, 3)" \
      in message
  assert "latent_channels': 4" in message and "no variant of vae.VARIANTS matches" in message
  assert message.count("\n  ") <= 13  # the first 12 problems and a count of the rest
  tiny = cvae.to_ldm_state_dict(_ours(_random(
      diffusers.AutoencoderKL, {k: v for k, v in cvae.config_to_diffusers(
          cvae.resolve_config("tiny-kl")).items() if k != "_class_name"}, 6))[0], "tiny-kl")
  with pytest.raises(UserError, match=r"(?s)does not fit.*matching variants: \[.*'tiny-kl'"):
    cvae.from_ldm_state_dict(tiny, "sd")
  with pytest.raises(UserError, match=r"unknown autoencoder variant 'sd4'; valid: \["):
    cvae.from_ldm_state_dict(tiny, "sd4")
  # from_diffusers given a pipeline root, a file, or a non-autoencoder folder.
  root = tmp_path / "pipeline"
  os.makedirs(root / "vae")
  common.write_json({"_class_name": "StableDiffusionPipeline", "vae": ["diffusers",
                     "AutoencoderKL"], "unet": ["diffusers", "UNet2DConditionModel"]},
                    str(root / "model_index.json"))
  with pytest.raises(UserError, match=r"is a diffusers pipeline folder \(model_index.json\), "
                                      r"not an autoencoder folder; point at its vae/ subfolder"):
    cvae.from_diffusers(str(root))
  single = str(tmp_path / "model.safetensors")
  common.save_safetensors({"x": np.zeros(2, np.float32)}, single)
  with pytest.raises(UserError, match="is a file; .*use from_ldm_checkpoint"):
    cvae.from_diffusers(single)
  common.write_json({"_class_name": "UNet2DConditionModel"}, str(root / "vae" / "config.json"))
  with pytest.raises(UserError, match="_class_name 'UNet2DConditionModel'; valid"):
    cvae.from_diffusers(str(root / "vae"))
  with pytest.raises(UserError, match="a folder: for a diffusers autoencoder folder use "
                                      "from_diffusers"):
    cvae.from_ldm_checkpoint(str(root), config)
  with pytest.raises(UserError, match="written as .safetensors only"):
    cvae.to_ldm_checkpoint(params, config, str(tmp_path / "vae.ckpt"))
