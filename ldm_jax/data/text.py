"""Text conditions of a text-to-image run: its tokenizer, prompts -> condition, and the
null (empty-prompt) condition used for condition dropout and classifier-free guidance.

`config.data.tokenizer` names the text side ("" = no text: a class-conditional run):

  shapes-words   the built-in word tokenizer of the captioned-shapes grammar
                 (ldm_jax/data/word_tokenizer.py), `data.max_tokens` long; the model's
                 own text encoder reads the tokens. A condition is {"tokens": int32
                 (B, L)}.
  sd3            SD3's frozen CLIP-L + OpenCLIP-G + T5 stack from the local diffusers
                 pipeline folder `data.text_pipeline`; training reads the embeddings
                 from a text-embedding cache (`data.latent_cache`, written by
                 `--mode=cache_latents`), sampling encodes prompts with the stack. A
                 condition is the encoders' parts (ldm_jax/pipelines/sd3_text.py
                 PART_KEYS): clip_l (B, 77, 768), clip_g (B, 77, 1280), t5 (B,
                 data.max_tokens, 4096), pooled_l (B, 768), pooled_g (B, 1280).

The null condition is one example's (no batch axis): the empty prompt "" encoded; for
sd3, `data.null_text` chooses it: "zeros" (every part zero: what SAI's conditioner
gives a dropped embedding and diffusers feeds for a missing T5, so any subset of the
encoders is in-distribution at inference) or "empty" (the empty prompt's embeddings,
the cache's own NULL_TEXT, which is diffusers' negative-prompt encoding of ""). A
dropped encoder (per-encoder dropout) takes the null's parts, so training and
classifier-free guidance use exactly the same unconditional input.
"""

import functools

import numpy as np

from ldm_jax.errors import check

TOKENIZERS = ("shapes-words", "sd3")
NULL_TEXTS = ("zeros", "empty")
# Per-example part shapes of SD3's stack (CLIP-L/14, OpenCLIP bigG/14, T5-XXL) when no
# cache says otherwise (ahead-of-time compilation before any data is encoded).
SD3_PART_WIDTHS = {"clip_l": 768, "clip_g": 1280, "t5": 4096, "pooled_l": 768,
                   "pooled_g": 1280}
SD3_CLIP_LENGTH = 77


def is_text(data_config) -> bool:
  """True when the run is conditioned on text (data.tokenizer is set)."""
  return bool(data_config.get("tokenizer", ""))


def is_sd3(data_config) -> bool:
  """True when the condition is SD3's frozen text stack (data.tokenizer = "sd3")."""
  return data_config.get("tokenizer", "") == "sd3"


def is_shapes_text(data_config) -> bool:
  """True when the prompts are the built-in shapes grammar's (data.tokenizer =
  "shapes-words"): the shapes itself (data.source = "shapes") or a latent cache of them
  (data.source = "latents"); its samples are scored by the shapes judge."""
  return data_config.get("tokenizer", "") == "shapes-words"


def tokenizer_for(data_config):
  """The tokenizer `data.tokenizer` names (see the module docstring)."""
  name = data_config.get("tokenizer", "")
  check(name in TOKENIZERS, f"unknown data.tokenizer {name!r}; valid: {list(TOKENIZERS)}")
  check(name != "sd3", "data.tokenizer='sd3' has three tokenizers (in data.text_pipeline); "
        "use sd3_stack(data_config)")
  from ldm_jax.data.word_tokenizer import WordTokenizer  # pylint: disable=import-outside-toplevel
  return WordTokenizer.for_shapes(max_length=int(data_config.get("max_tokens", 12)))


def sd3_settings(data_config) -> dict:
  """What decides SD3 embeddings besides the weights (recorded in a cache)."""
  clip_skip = int(data_config.get("clip_skip", 0))
  check(clip_skip >= 0, f"data.clip_skip={clip_skip} must be >= 0 (0 = the penultimate "
        "CLIP layer, as SD3)")
  length = int(data_config.get("max_tokens", 77))
  check(length >= 1, f"data.max_tokens={length} (T5's max_sequence_length) must be >= 1")
  return {"max_sequence_length": length, "clip_skip": clip_skip or None,
          "use_t5": bool(data_config.get("text_use_t5", True))}


def null_text(data_config) -> str:
  """`data.null_text` of an sd3 run (see the module docstring), checked."""
  value = data_config.get("null_text", "zeros")
  check(value in NULL_TEXTS, f"data.null_text={value!r}; valid: {list(NULL_TEXTS)}")
  return value


@functools.lru_cache(maxsize=2)
def _load_stack(folder: str, use_t5: bool):
  from ldm_jax.pipelines.sd3 import load_text_stack  # pylint: disable=import-outside-toplevel
  return load_text_stack(folder, load_t5=use_t5)


def sd3_stack(data_config):
  """The SD3 text stack of `data.text_pipeline` (loaded once per process)."""
  folder = data_config.get("text_pipeline", "")
  check(bool(folder), "data.tokenizer='sd3' needs data.text_pipeline=DIR: a local diffusers "
        "StableDiffusion3Pipeline folder with text_encoder, text_encoder_2, text_encoder_3 and "
        "their tokenizers")
  return _load_stack(str(folder), sd3_settings(data_config)["use_t5"])


def sd3_encode(stack, data_config, prompts) -> dict:
  """{part: float32 numpy (B, ...)} of prompts through SD3's stack."""
  settings = sd3_settings(data_config)
  parts = stack.encode_parts(list(prompts), max_sequence_length=settings["max_sequence_length"],
                             clip_skip=settings["clip_skip"])
  return {k: np.asarray(v, np.float32) for k, v in parts.items()}


def _cache_text(data_config):
  """The text section of the run's cache manifest (None without a cache)."""
  cache = data_config.get("latent_cache", "")
  if data_config.get("source", "") != "latents" or not cache:
    return None
  from ldm_jax.data.latents import read_manifest  # pylint: disable=import-outside-toplevel
  text = read_manifest(cache).get("text")
  check(bool(text), f"data.latent_cache={cache!r} holds no text embeddings; a data.tokenizer="
        "'sd3' run needs a cache written with the text stack (--mode=cache_latents with "
        "data.text_pipeline set)")
  settings = sd3_settings(data_config)
  differ = {k: (v, text["info"].get(k)) for k, v in settings.items() if text["info"].get(k) != v}
  check(not differ, f"data.latent_cache={cache!r} was encoded with other text settings: "
        + ", ".join(f"{k}: config {a!r} vs cache {b!r}" for k, (a, b) in differ.items())
        + " (data.max_tokens = max_sequence_length, data.clip_skip, data.text_use_t5 = "
        "use_t5); set them as the cache has them, or encode again")
  return text


def prompt_condition(data_config, prompts) -> dict:
  """The condition of a list of prompts: {"tokens": int32 (B, L)} (truncation is logged)
  or, for sd3, the stack's parts — checked to come from the encoders that wrote the
  run's cache and rounded to its dtype, as the training inputs were."""
  if not is_sd3(data_config):
    ids, _, _ = tokenizer_for(data_config)(list(prompts))
    return {"tokens": np.asarray(ids, np.int32)}
  stack = sd3_stack(data_config)
  parts = sd3_encode(stack, data_config, prompts)
  text = _cache_text(data_config)
  if text is not None:
    fingerprint = stack.fingerprint(**sd3_settings(data_config))
    check(fingerprint == text["info"]["fingerprint"],
          f"the text encoders of data.text_pipeline={data_config.text_pipeline!r} (with "
          f"{sd3_settings(data_config)}) are not the ones that wrote the cache "
          f"{data_config.latent_cache!r} ({text['info'].get('pipeline')!r} with "
          f"{ {k: text['info'].get(k) for k in sd3_settings(data_config)} }); use the same "
          "folder and data.max_tokens / data.clip_skip / data.text_use_t5")
    from ldm_jax.data.latents import read_manifest  # pylint: disable=import-outside-toplevel
    dtype = read_manifest(data_config.latent_cache)["dtype"]
    parts = {k: v.astype(dtype).astype(np.float32) for k, v in parts.items()}
  return parts


def cached_grid_condition(data_config, count: int = 16):
  """(captions, condition) of the first `count` examples of an SD3 text-embedding
  cache (the training-time sample grid: the stored embeddings, so no text encoder is
  loaded during training); None for other runs."""
  if not is_sd3(data_config) or _cache_text(data_config) is None:
    return None
  from ldm_jax.data.latents import LatentCacheSource  # pylint: disable=import-outside-toplevel
  source = LatentCacheSource(data_config.latent_cache)
  records = [source[i] for i in range(min(count, len(source)))]
  parts = {k: np.stack([r[k] for r in records]).astype(np.float32)
           for k in source.manifest["text"]["parts"]}
  return [str(r.get("caption", "")) for r in records], parts


def null_condition(data_config) -> dict:
  """The null condition, one example (no batch axis): the empty prompt's, or for sd3
  with data.null_text = "zeros" zeros of every part."""
  if is_sd3(data_config) and null_text(data_config) == "zeros":
    return {k: np.zeros(shape[1:], np.float32)
            for k, (shape, _) in condition_struct(data_config, 1).items()}
  if is_sd3(data_config) and _cache_text(data_config) is not None:
    from ldm_jax.data.latents import read_null_text  # pylint: disable=import-outside-toplevel
    return {k: np.asarray(v, np.float32) for k, v in
            read_null_text(data_config.latent_cache).items()}
  return {key: value[0] for key, value in prompt_condition(data_config, [""]).items()}


def condition_struct(data_config, batch: int) -> dict:
  """{key: (shape, dtype)} of a batch's text condition (for ahead-of-time lowering):
  tokens, or for sd3 the cache's parts in its dtype (without a cache: SD3's widths,
  SD3_PART_WIDTHS, in `cache.dtype`'s stead float16)."""
  if not is_sd3(data_config):
    return {"tokens": ((batch, int(data_config.get("max_tokens", 12))), np.int32)}
  text = _cache_text(data_config)
  if text is not None:
    from ldm_jax.data.latents import read_manifest  # pylint: disable=import-outside-toplevel
    dtype = np.dtype(read_manifest(data_config.latent_cache)["dtype"])
    return {k: ((batch, *shape), dtype) for k, shape in text["parts"].items()}
  length = sd3_settings(data_config)["max_sequence_length"]
  w = SD3_PART_WIDTHS
  return {"clip_l": ((batch, SD3_CLIP_LENGTH, w["clip_l"]), np.float16),
          "clip_g": ((batch, SD3_CLIP_LENGTH, w["clip_g"]), np.float16),
          "t5": ((batch, length, w["t5"]), np.float16),
          "pooled_l": ((batch, w["pooled_l"]), np.float16),
          "pooled_g": ((batch, w["pooled_g"]), np.float16)}
