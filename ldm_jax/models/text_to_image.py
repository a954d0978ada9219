"""The trainable text-to-image denoiser: an MM-DiT and, optionally, its own text encoder.

`config.model.name = "mmdit"` builds `TextToImage`, called like every ldm_jax
denoiser as `model.apply({"params": p}, x, model_time, cond, train)`, where the
condition is a dict instead of class labels:

  {"tokens": int (B, L)}        token ids; the model's own (trainable) text encoder
                                turns them into the MM-DiT's context (its last hidden
                                states) and pooled vector (their mean over non-pad tokens)
  {"context": (B, L, D), "pooled": (B, P)}   precomputed text embeddings
  {"clip_l", "clip_g", "t5", "pooled_l", "pooled_g"}   SD3's frozen CLIP-L / CLIP-G / T5
                                parts (from a text-embedding cache), assembled here as
                                diffusers' SD3 pipeline does (`sd3_text.assemble_parts`)

Parameters: {"denoiser": MM-DiT params (exportable as a diffusers
SD3Transformer2DModel), "text_encoder": ...}. Condition dropout for classifier-free
guidance happens in the training step (it swaps in the empty prompt's condition; see
`ldm_jax.training.step.drop_condition`), so the unconditional input at sampling time
is exactly what the model saw when trained.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.errors import check
from ldm_jax.models import mmdit, text_encoders


VARIANTS = mmdit.VARIANTS  # the denoiser's rows (config.model.variant)


class TextToImage(nn.Module):
  """MM-DiT conditioned on tokens (through `text_encoder`) or on text embeddings.

  Attributes:
    denoiser: the `MMDiT`.
    text_encoder: a `CLIPTextEncoder` (trained with the denoiser) or None when the
      condition is precomputed embeddings.
    pad_id: the tokenizer's padding id (masked in attention and pooling).
  """
  denoiser: mmdit.MMDiT
  text_encoder: nn.Module | None = None
  pad_id: int = 0

  null_class = None  # no class labels; the null condition is the empty prompt's

  def encode_text(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(context (B, L, D), pooled (B, D)) of token ids (B, L)."""
    check(self.text_encoder is not None, "TextToImage: this model has no text encoder "
          "(model.text_encoder is ''); condition it on {'context', 'pooled'} embeddings")
    mask = (tokens != self.pad_id).astype(jnp.int32)
    context = self.text_encoder(tokens, attention_mask=mask)["last_hidden_state"]
    weights = mask[..., None].astype(context.dtype)
    pooled = (context * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
    return context, pooled

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, cond: dict, train: bool = False) -> jax.Array:
    check(isinstance(cond, dict), f"TextToImage takes a condition dict ({{'tokens'}}, "
          f"{{'context', 'pooled'}} or SD3's parts), got {type(cond).__name__}")
    if "tokens" in cond:
      context, pooled = self.encode_text(cond["tokens"])
    elif "t5" in cond:
      from ldm_jax.pipelines.sd3_text import PART_KEYS, assemble_parts  # pylint: disable=import-outside-toplevel
      missing = [k for k in PART_KEYS if k not in cond]
      check(not missing, f"TextToImage: the SD3 condition lacks the parts {missing}")
      context, pooled = assemble_parts({k: cond[k].astype(jnp.float32) for k in PART_KEYS})
    else:
      missing = [k for k in ("context", "pooled") if k not in cond]
      check(not missing, f"TextToImage: the condition lacks {missing}; give 'tokens' or "
            "both 'context' and 'pooled'")
      context, pooled = cond["context"], cond["pooled"]
    return self.denoiser(x, t, context, pooled, train=train)


def build(model_config, *, input_size: int, in_channels: int, num_classes: int = 0,
          **overrides) -> TextToImage:
  """`TextToImage` from `config.model`: `variant` (a row of mmdit.VARIANTS) plus MM-DiT
  field overrides; `text_encoder` names a row of text_encoders.VARIANTS (its vocabulary
  set by `text_vocab_size`, its positions by `text_max_length`) or is '' for
  precomputed embeddings (then `context_dim` / `pooled_dim` come from the variant or
  the config)."""
  check(num_classes == 0, f"model.name='mmdit' is text-conditioned: data.num_classes must be "
        f"0, got {num_classes}")
  encoder = None
  name = model_config.get("text_encoder", "")
  widths = {}
  if name:
    encoder_overrides = {}
    if model_config.get("text_vocab_size", 0):
      encoder_overrides["vocab_size"] = int(model_config.text_vocab_size)
    if model_config.get("text_max_length", 0):
      encoder_overrides["max_positions"] = int(model_config.text_max_length)
    if model_config.get("dtype", "float32") != "float32":
      encoder_overrides["dtype"] = model_config.dtype
    encoder = text_encoders.build(name, **encoder_overrides)
    check(isinstance(encoder, text_encoders.CLIPTextEncoder),
          f"model.text_encoder={name!r} is a T5 encoder; a trainable text encoder here must "
          "be a CLIP-style one (T5 embeddings come precomputed)")
    widths = dict(context_dim=encoder.hidden_size, pooled_dim=encoder.hidden_size)
  denoiser = mmdit.build(model_config, input_size=input_size, in_channels=in_channels,
                         **widths, **overrides)
  return TextToImage(denoiser=denoiser, text_encoder=encoder,
                     pad_id=int(model_config.get("text_pad_id", 0)))
