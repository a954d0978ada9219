"""A trained text-to-image run (`model.name = "mmdit"`) as files PyTorch tools load.

  python -m ldm_jax.main --config=configs/mmdit_256.py:shapes --workdir=runs/shapes \
      --mode=export --export=runs/shapes_export

writes into the new folder `--export`:
  transformer/    the MM-DiT as a diffusers `SD3Transformer2DModel` folder (config.json +
                  diffusion_pytorch_model.safetensors, float32; EMA weights if
                  sample.use_ema)
  text_encoder/   the run's own text encoder, if it has one, as a transformers
                  `CLIPTextModel` folder
  word_tokenizer.json   its tokenizer (the built-in word tokenizer), when it has one
  vae/            for a latent MM-DiT, the autoencoder that decodes its samples as a
                  diffusers AutoencoderKL / VQModel folder, with the latent cache's
                  scaling / shift factors (e.g. cache.scale="auto"'s) in its config
Nothing existing is overwritten.
"""

import dataclasses
import logging
import os

from ldm_jax.errors import check

logger = logging.getLogger("ldm_jax")


def denoiser_kwargs(model) -> dict:
  """The MMDiT's constructor fields (what ldm_jax.convert.mmdit takes), dtype left out."""
  skip = {"parent", "name", "dtype", "remat", "attention"}
  return {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name not in skip}


def export_text_to_image(config, workdir: str, out: str) -> str:
  """Writes the run in `workdir` (its latest checkpoint) as described in the module
  docstring; returns `out`."""
  # pylint: disable=import-outside-toplevel
  from ldm_jax.convert import mmdit as convert_mmdit
  from ldm_jax.convert import text_encoders as convert_text
  from ldm_jax.data.text import tokenizer_for
  from ldm_jax.sample import restore_for_inference
  check(config.model.name == "mmdit", f"export_text_to_image: model.name is "
        f"{config.model.name!r}, not 'mmdit'")
  check(not os.path.exists(out), f"{out!r} exists; nothing was overwritten (choose a new path)")
  prediction = config.diffusion.get("prediction", "") or "velocity"
  check(prediction == "velocity", f"diffusion.prediction={prediction!r}: diffusers' SD3 "
        "pipeline integrates the network's output as the velocity, so only a velocity-"
        "predicting MM-DiT exports as an SD3Transformer2DModel")
  model, _, _, params, step = restore_for_inference(config, workdir, "export")
  from ldm_jax.first_stage import decoder_for
  stage = decoder_for(config)  # latent denoisers: their autoencoder (fingerprint-checked)
  import jax
  params = jax.device_get(params)
  os.makedirs(out)
  convert_mmdit.to_diffusers(params["denoiser"], denoiser_kwargs(model.denoiser),
                             os.path.join(out, "transformer"))
  if model.text_encoder is not None:
    convert_text.save_text_encoder(model.text_encoder, params["text_encoder"],
                                   os.path.join(out, "text_encoder"))
    tokenizer = tokenizer_for(config.data)
    tokenizer.save(out)
  if stage is not None:
    from ldm_jax.convert import vae as convert_vae
    vae_config = {k: v for k, v in stage.config.items() if k not in ("dtype", "attention")}
    vae_config.update(scaling_factor=float(stage.model.scaling_factor),
                      shift_factor=float(stage.model.shift_factor))
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    convert_vae.to_diffusers(jax.device_get(stage.params), vae_config, os.path.join(out, "vae"),
                             sample_size=int(config.data.image_size) * factor)
  logger.info("exported step %d of %s to %s", step, workdir, out)
  return out
