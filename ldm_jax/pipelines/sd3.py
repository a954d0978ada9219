"""Stable Diffusion 3 / 3.5 text-to-image in JAX, equal to diffusers' StableDiffusion3Pipeline.

  pipe = StableDiffusion3Pipeline.from_diffusers("/models/stable-diffusion-3.5-medium")
  images = pipe("a red circle left of a blue square", negative_prompt="blurry",
                height=1024, width=768, num_inference_steps=28, guidance_scale=7.0, seed=0)
  # images: float32 NHWC numpy in [0, 1]

Loads a LOCAL diffusers pipeline folder (model_index.json, transformer/, vae/,
text_encoder{,_2,_3}/, tokenizer{,_2,_3}/, scheduler/) without torch: safetensors into
ldm_jax's Flax MM-DiT, AutoencoderKL, CLIP and T5 encoders; tokenizers through
transformers from the folder only; the scheduler through `from_diffusers_scheduler`.
A folder whose model_index.json lists text_encoder_3 as null (or `load_t5=False`)
runs without T5: its part of the context is zeros, as diffusers does.

One call = text encoding (jitted per encoder) + one jitted program that runs the
whole sampling loop as a `lax.scan` (classifier-free guidance on a doubled batch
[negative | positive], optional skip-layer guidance) and decodes with the VAE.
"""

import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.convert import common
from ldm_jax.errors import check
from ldm_jax.pipelines.sd3_text import MAX_T5_LENGTH, SD3TextStack, TextEncoder

PIPELINE_CLASSES = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                    "StableDiffusion3InpaintPipeline")
REQUIRED = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
            "scheduler")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _cast(params, dtype):
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), params)


def _as_list(value, name: str) -> list[str]:
  if isinstance(value, str):
    return [value]
  check(isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value),
        f"{name} must be a string or a list of strings, got {type(value).__name__}")
  return list(value)


def read_model_index(folder: str) -> dict:
  """model_index.json of an SD3 pipeline folder; a clear error for anything else."""
  folder = os.fspath(folder)
  check(os.path.isdir(folder), f"{folder!r} is not a folder; give a local diffusers "
        "StableDiffusion3Pipeline folder (model_index.json, transformer/, vae/, ...)")
  index_path = os.path.join(folder, "model_index.json")
  check(os.path.isfile(index_path), f"{folder!r} is not a diffusers pipeline folder: it has "
        f"no model_index.json (found: {sorted(os.listdir(folder))[:12]})")
  index = common.read_json(index_path)
  name = index.get("_class_name")
  check(name in PIPELINE_CLASSES, f"{folder!r} holds a {name!r}, not an SD3 pipeline; valid "
        f"_class_name: {list(PIPELINE_CLASSES)}")
  missing = [c for c in REQUIRED if not _present(index, c)
             or not os.path.isdir(os.path.join(folder, c))]
  check(not missing, f"SD3 pipeline {folder!r} lacks the component(s) {missing} (model_index "
        f"lists {sorted(k for k in index if not k.startswith('_'))})")
  return index


def _present(index: dict, component: str) -> bool:
  entry = index.get(component)
  return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None


def load_text_stack(folder: str, *, dtype: str = "float32", load_t5: bool = True,
                    context_dim: int | None = None, index: dict | None = None) -> SD3TextStack:
  """The CLIP-L + CLIP-G (+ T5) stack of a local diffusers SD3 pipeline folder (its
  text_encoder*/ and tokenizer*/ components; no torch, no network).

  Args:
    folder: the pipeline folder.
    dtype: "float32" or "bfloat16".
    load_t5: False leaves T5 out (its part of the context is zeros).
    context_dim: the transformer's joint_attention_dim (default: T5's width, else
      read from the folder's transformer/config.json); T5's width must equal it.
    index: the folder's model_index.json when the caller has read it.
  """
  # pylint: disable=import-outside-toplevel  (heavy imports only when loading)
  from ldm_jax.convert import text_encoders as text_convert
  from ldm_jax.data.tokenizers import load_tokenizer
  check(dtype in DTYPES, f"dtype={dtype!r}; valid: {sorted(DTYPES)}")
  compute = DTYPES[dtype]
  folder = os.fspath(folder)
  index = read_model_index(folder) if index is None else index
  sub = lambda name: os.path.join(folder, name)  # noqa: E731

  def encoder(te_name, tok_name, kind):
    module, te_params = text_convert.load_text_encoder(sub(te_name))
    check(getattr(module, "kind", kind) == kind, f"SD3 pipeline {folder!r}: {te_name} is a "
          f"{getattr(module, 'kind', '?')} encoder, expected {kind}")
    tokenizer = load_tokenizer(sub(tok_name), kind=kind, model_vocab_size=module.vocab_size)
    return TextEncoder(tokenizer, module.clone(dtype=compute), _cast(te_params, compute), kind)

  clip_l = encoder("text_encoder", "tokenizer", "clip")
  clip_g = encoder("text_encoder_2", "tokenizer_2", "clip")
  t5 = None
  if load_t5 and _present(index, "text_encoder_3"):
    check(_present(index, "tokenizer_3") and os.path.isdir(sub("tokenizer_3")),
          f"SD3 pipeline {folder!r} has text_encoder_3 but no tokenizer_3")
    t5 = encoder("text_encoder_3", "tokenizer_3", "t5")
  for name, te in (("text_encoder", clip_l), ("text_encoder_2", clip_g)):
    check(te.module.projection_dim, f"SD3 pipeline {folder!r}: {name} has no text projection "
          "(SD3 needs CLIPTextModelWithProjection)")
  if context_dim is None:
    if t5 is not None:
      context_dim = t5.module.d_model
    else:
      config_path = sub(os.path.join("transformer", "config.json"))
      check(os.path.isfile(config_path), f"SD3 pipeline {folder!r}: without T5 the context "
            f"width comes from {config_path}, which is missing")
      context_dim = int(common.read_json(config_path)["joint_attention_dim"])
  if t5 is not None:
    check(t5.module.d_model == context_dim, f"SD3 pipeline {folder!r}: T5 width "
          f"{t5.module.d_model} differs from joint_attention_dim {context_dim}")
  clip_length = getattr(clip_l.tokenizer, "model_max_length", 77)
  clip_length = 77 if not isinstance(clip_length, int) or clip_length > 10 ** 6 else clip_length
  return SD3TextStack(clip_l, clip_g, t5, context_dim, clip_length)


class StableDiffusion3Pipeline:
  """MM-DiT + VAE + text stack + flow-matching scheduler; see the module docstring.

  Attributes:
    transformer, transformer_params: the `MMDiT` and its params.
    vae, vae_params: the `AutoencoderKL` and its params (scaling / shift factors on it).
    text: the `SD3TextStack`.
    scheduler: a `SchedulerSetup` (FlowMatchEulerDiscreteScheduler).
    dtype: compute (and parameter) dtype, float32 or bfloat16.
  """

  def __init__(self, transformer, transformer_params, vae, vae_params, text: SD3TextStack,
               scheduler, dtype=jnp.float32):
    self.transformer, self.transformer_params = transformer, transformer_params
    self.vae, self.vae_params = vae, vae_params
    self.text, self.scheduler, self.dtype = text, scheduler, dtype
    self.vae_scale_factor = 2 ** (len(vae.block_out_channels) - 1)
    check(vae.latent_channels == transformer.in_channels,
          f"SD3 pipeline: the VAE has {vae.latent_channels} latent channels but the "
          f"transformer takes {transformer.in_channels}; they must match")
    out_channels = transformer.out_channels or transformer.in_channels
    check(out_channels == transformer.in_channels,
          f"SD3 pipeline: the transformer predicts {out_channels} channels for "
          f"{transformer.in_channels} input channels; flow matching needs them equal")
    self._programs = {}

  # -- loading -------------------------------------------------------------------
  @classmethod
  def from_diffusers(cls, folder: str, *, dtype: str = "float32", load_t5: bool = True,
                     variant: str | None = None) -> "StableDiffusion3Pipeline":
    """Loads a local diffusers SD3 / SD3.5 pipeline folder (no torch, no network).

    Args:
      folder: the pipeline folder (model_index.json and component subfolders).
      dtype: "float32" or "bfloat16" (parameters are cast, compute runs in it).
      load_t5: False skips text_encoder_3 (T5-XXL, 4.7 B parameters): zeros instead.
      variant: weight variant of transformer / VAE files, e.g. "fp16".
    """
    # pylint: disable=import-outside-toplevel  (heavy imports only when loading)
    from ldm_jax.convert import mmdit as mmdit_convert
    from ldm_jax.convert import vae as vae_convert
    from ldm_jax.diffusion.diffusers_schedulers import from_diffusers_scheduler
    from ldm_jax.models import vae as vae_models
    from ldm_jax.models.mmdit import MMDiT
    check(dtype in DTYPES, f"dtype={dtype!r}; valid: {sorted(DTYPES)}")
    compute = DTYPES[dtype]
    folder = os.fspath(folder)
    index = read_model_index(folder)
    sub = lambda name: os.path.join(folder, name)

    params, kwargs = mmdit_convert.from_diffusers(sub("transformer"))
    transformer = MMDiT(**dict(kwargs, dtype=compute))
    vae_params, vae_config = vae_convert.from_diffusers(sub("vae"), variant=variant)
    check(vae_config["kind"] == "kl", f"SD3 pipeline {folder!r}: the vae is a "
          f"{vae_config['kind']!r} autoencoder; SD3 needs an AutoencoderKL")
    vae = vae_models.make(dict(vae_config, dtype=compute))

    text = load_text_stack(folder, dtype=dtype, load_t5=load_t5,
                           context_dim=transformer.context_dim, index=index)
    check(text.pooled_dim == transformer.pooled_dim, f"SD3 pipeline {folder!r}: the CLIP "
          f"projections give {text.pooled_dim} pooled features but the transformer takes "
          f"{transformer.pooled_dim}")
    scheduler = from_diffusers_scheduler(folder)
    check(scheduler.name == "flow_euler", f"SD3 pipeline {folder!r}: scheduler "
          f"{scheduler.class_name!r} is not a flow-matching scheduler; SD3 uses "
          "FlowMatchEulerDiscreteScheduler")
    return cls(transformer, _cast(params, compute), vae, _cast(vae_params, compute), text,
               scheduler, compute)

  # -- generation ----------------------------------------------------------------
  def encode_prompt(self, prompt, prompt_2=None, prompt_3=None, *, max_sequence_length=256,
                    clip_skip=None):
    """(context, pooled) for prompts (see `SD3TextStack.encode`)."""
    prompts = _as_list(prompt, "prompt")
    # diffusers: `prompt_2 or prompt` (None, "" and [] fall back to `prompt`).
    p2 = _as_list(prompt_2, "prompt_2") if prompt_2 else None
    p3 = _as_list(prompt_3, "prompt_3") if prompt_3 else None
    return self.text.encode(prompts, p2, p3, max_sequence_length=max_sequence_length,
                            clip_skip=clip_skip)

  def __call__(self, prompt: str | Sequence[str] | None = None, *, prompt_2=None,
               prompt_3=None, negative_prompt=None, negative_prompt_2=None,
               negative_prompt_3=None, height: int | None = None, width: int | None = None,
               num_inference_steps: int = 28, sigmas: Sequence[float] | None = None,
               guidance_scale: float = 7.0, num_images_per_prompt: int = 1,
               latents: np.ndarray | None = None, seed: int | None = None,
               prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
               negative_pooled_prompt_embeds=None, output_type: str = "np",
               max_sequence_length: int = 256, clip_skip: int | None = None,
               skip_guidance_layers: Sequence[int] | None = None,
               skip_layer_guidance_scale: float = 2.8, skip_layer_guidance_stop: float = 0.2,
               skip_layer_guidance_start: float = 0.01, mu: float | None = None,
               **unsupported):
    """Generates images; arguments as diffusers' StableDiffusion3Pipeline.__call__.

    `latents` are diffusers-layout NCHW (B·n, C, h, w) numpy noise; otherwise `seed`
    (default 0) draws them with jax.random. `prompt_embeds` & co. (numpy, as
    `encode_prompt` returns them) replace the text encoders. Returns, by `output_type`:
    "np" float32 NHWC numpy in [0, 1]; "pil" a list of PIL images; "latent" the final
    latents, NCHW numpy (diffusers' layout).
    """
    check(not unsupported, f"StableDiffusion3Pipeline: unsupported argument(s) "
          f"{sorted(unsupported)} (torch generators: use seed= or latents=; ip-adapter, "
          "callbacks, joint_attention_kwargs and return_dict do not exist here; the result "
          "is the images themselves)")
    check(output_type in OUTPUT_TYPES, f"output_type={output_type!r}; valid: {list(OUTPUT_TYPES)}")
    _check_int("num_images_per_prompt", num_images_per_prompt, 1)
    _check_int("max_sequence_length", max_sequence_length, 1, MAX_T5_LENGTH)
    guidance_scale = _check_number("guidance_scale", guidance_scale)
    skip_layer_guidance_scale = _check_number("skip_layer_guidance_scale",
                                              skip_layer_guidance_scale)
    if sigmas is not None:
      sigmas = tuple(_check_number("sigmas entry", v) for v in np.asarray(sigmas).reshape(-1))
      check(len(sigmas) >= 1, "sigmas: give at least one value (or None)")
    else:
      _check_int("num_inference_steps", num_inference_steps, 1)
    if seed is not None:
      _check_int("seed", seed, None)
    factor = self.vae_scale_factor * self.transformer.patch_size
    default = self.transformer.input_size * self.vae_scale_factor
    height, width = height or default, width or default  # diffusers: `height or default`
    _check_int("height", height, 1)
    _check_int("width", width, 1)
    check(height % factor == 0 and width % factor == 0,
          f"height and width must be multiples of {factor} (VAE factor "
          f"{self.vae_scale_factor} x patch size {self.transformer.patch_size}); got "
          f"{height}x{width}")
    cfg = guidance_scale > 1
    context, pooled, batch = self._prompt_condition(
        prompt, prompt_2, prompt_3, prompt_embeds, pooled_prompt_embeds,
        max_sequence_length, clip_skip)
    neg_context = neg_pooled = None
    if cfg:
      if negative_prompt_embeds is not None:
        check(negative_pooled_prompt_embeds is not None, "negative_prompt_embeds needs "
              "negative_pooled_prompt_embeds too")
        neg_context, neg_pooled = _embeds(negative_prompt_embeds, negative_pooled_prompt_embeds,
                                          context.shape, pooled.shape, "negative_")
      else:
        negative = _negatives(negative_prompt, batch, "negative_prompt")
        negative_2 = _negatives(negative_prompt_2, batch, "negative_prompt_2", negative)
        negative_3 = _negatives(negative_prompt_3, batch, "negative_prompt_3", negative)
        # diffusers encodes negative prompts without clip_skip, whatever it is.
        neg_context, neg_pooled = self.text.encode(
            negative, negative_2, negative_3, max_sequence_length=max_sequence_length)
    n = num_images_per_prompt
    rep = lambda a: None if a is None else jnp.repeat(jnp.asarray(a, jnp.float32), n, axis=0)
    context, pooled, neg_context, neg_pooled = map(rep, (context, pooled, neg_context, neg_pooled))
    total = batch * n
    h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
    channels = self.transformer.in_channels
    if latents is not None:
      latents = np.asarray(latents)
      check(latents.shape == (total, channels, h, w),
            f"latents have shape {latents.shape}; expected {(total, channels, h, w)} "
            f"(batch x num_images_per_prompt, channels, height/{self.vae_scale_factor}, "
            f"width/{self.vae_scale_factor}), NCHW as diffusers")
      noise = jnp.asarray(latents.transpose(0, 2, 3, 1), jnp.float32)
    else:
      noise = jax.random.normal(jax.random.key(0 if seed is None else int(seed)),
                                (total, h, w, channels), jnp.float32)

    opts = {}
    if sigmas is not None:
      opts["sigmas"] = sigmas
    if self.scheduler.options.get("use_dynamic_shifting"):
      if mu is None:
        opts["image_seq_len"] = (h // self.transformer.patch_size) * (
            w // self.transformer.patch_size)
      else:
        opts["mu"] = _check_number("mu", mu)
    # (diffusers ignores `mu` when the scheduler does not shift dynamically; so do we.)
    steps = None if sigmas is not None else int(num_inference_steps)
    slg = tuple(int(i) for i in skip_guidance_layers) if (cfg and skip_guidance_layers) else ()
    # diffusers skips nothing for indices that name no block; so do we.
    slg = tuple(i for i in slg if 0 <= i < self.transformer.depth)
    key_ = (steps, tuple(sorted(opts.items())), cfg, slg, float(skip_layer_guidance_start),
            float(skip_layer_guidance_stop), output_type == "latent")
    if key_ not in self._programs:
      sampler = self.scheduler.sampler(steps, **opts)
      n_steps = len(sampler.timesteps)
      index = np.arange(n_steps)
      # diffusers: step i uses skip-layer guidance when n·start < i < n·stop.
      active = (index > n_steps * skip_layer_guidance_start) & (
          index < n_steps * skip_layer_guidance_stop)
      self._programs[key_] = jax.jit(functools.partial(
          self._generate, sampler=sampler, cfg=cfg, slg=slg, slg_steps=active,
          decode=output_type != "latent"))
    out = self._programs[key_](
        self.transformer_params, self.vae_params, noise, context, pooled, neg_context,
        neg_pooled, jnp.float32(guidance_scale), jnp.float32(skip_layer_guidance_scale),
        jax.random.key(0 if seed is None else int(seed)))
    out = np.asarray(out, np.float32)
    if output_type == "latent":
      return out.transpose(0, 3, 1, 2)
    if output_type == "pil":
      from PIL import Image  # pylint: disable=import-outside-toplevel
      return [Image.fromarray(np.round(image * 255).astype(np.uint8)) for image in out]
    return out

  def _prompt_condition(self, prompt, prompt_2, prompt_3, prompt_embeds, pooled_prompt_embeds,
                        max_sequence_length, clip_skip):
    """(context, pooled, batch) from prompts or from given embeddings (one of them)."""
    if prompt_embeds is not None:
      check(prompt is None, "give prompt or prompt_embeds, not both (as diffusers)")
      check(pooled_prompt_embeds is not None,
            "prompt_embeds needs pooled_prompt_embeds too (as diffusers)")
      width = self.transformer.context_dim
      context = np.asarray(prompt_embeds, np.float32)
      check(context.ndim == 3 and context.shape[-1] == width,
            f"prompt_embeds must be (B, L, {width}), got shape {context.shape}")
      context, pooled = _embeds(prompt_embeds, pooled_prompt_embeds, context.shape,
                                (context.shape[0], self.transformer.pooled_dim), "")
      return context, pooled, context.shape[0]
    check(prompt is not None, "give prompt (a string or a list of strings) or prompt_embeds")
    prompts = _as_list(prompt, "prompt")
    check(len(prompts) >= 1, "prompt: give at least one prompt")
    context, pooled = self.encode_prompt(prompts, prompt_2, prompt_3,
                                         max_sequence_length=max_sequence_length,
                                         clip_skip=clip_skip)
    return context, pooled, len(prompts)

  def _generate(self, params, vae_params, noise, context, pooled, neg_context, neg_pooled,
                scale, slg_scale, key, *, sampler, cfg, slg, slg_steps, decode):
    """The jitted body: sampling loop (lax.scan) + VAE decode + [0, 1] images."""
    dtype = self.dtype
    apply = lambda x, t, c, p, skip=(): self.transformer.apply(
        {"params": params}, x.astype(dtype), t, c.astype(dtype), p.astype(dtype),
        skip_layers=skip)

    def model_fn(x, t, i):
      if not cfg:
        return apply(x, t, context, pooled)
      both = apply(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                   jnp.concatenate([neg_context, context]), jnp.concatenate([neg_pooled, pooled]))
      uncond, cond = jnp.split(both, 2)
      guided = uncond + scale * (cond - uncond)
      if not slg:
        return guided
      with_skip = lambda g: g + (cond - apply(x, t, context, pooled, slg)) * slg_scale
      return jax.lax.cond(jnp.asarray(slg_steps)[i], with_skip, lambda g: g, guided)

    latents = sampler(model_fn, noise, key, pass_step_index=True)
    if not decode:
      return latents
    z = latents / self.vae.scaling_factor + self.vae.shift_factor
    image = self.vae.apply({"params": vae_params}, z.astype(dtype), method="decode")
    return jnp.clip(image.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


OUTPUT_TYPES = ("np", "pil", "latent")


def _check_int(name: str, value, low: int | None, high: int | None = None) -> None:
  ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
  ok = ok and (low is None or value >= low) and (high is None or value <= high)
  bounds = (f" >= {low}" if low is not None else "") + (f" and <= {high}" if high else "")
  check(ok, f"{name}={value!r} must be an int{bounds}")


def _check_number(name: str, value) -> float:
  ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
  check(ok and np.isfinite(value), f"{name}={value!r} must be a finite number")
  return float(value)


def _embeds(context, pooled, context_shape, pooled_shape, prefix: str):
  """Given (negative_)prompt_embeds / pooled ones as float32 arrays, shape-checked."""
  context, pooled = np.asarray(context, np.float32), np.asarray(pooled, np.float32)
  check(context.shape == tuple(context_shape), f"{prefix}prompt_embeds have shape "
        f"{context.shape}; expected {tuple(context_shape)}")
  check(pooled.shape == tuple(pooled_shape), f"{prefix}pooled_prompt_embeds have shape "
        f"{pooled.shape}; expected {tuple(pooled_shape)}")
  return jnp.asarray(context), jnp.asarray(pooled)


def _negatives(value, batch: int, name: str, default: list[str] | None = None) -> list[str]:
  """Negative prompts for a batch, as diffusers: a falsy value (None, "", []) -> `default`
  or empty strings; one string is repeated; a list must have the batch's length."""
  if not value:
    return list(default) if default is not None else [""] * batch
  values = _as_list(value, name)
  if isinstance(value, str):
    values = values * batch
  check(len(values) == batch, f"{name} has {len(values)} entries but there are {batch} "
        "prompts; give one per prompt (or a single string)")
  return values
