"""Text conditions of a text-to-image run: its tokenizer, prompts -> condition, and the
null (empty-prompt) condition used for condition dropout and classifier-free guidance.

`config.data.tokenizer` names the tokenizer ("" = no text: a class-conditional run):

  shapes-words   the built-in word tokenizer of the captioned-shapes grammar
                 (ldm_jax/data/word_tokenizer.py), `data.max_tokens` long.

A condition is a dict {"tokens": int32 (B, L)}; the null condition is one example's
({"tokens": (L,)}): the tokens of the empty prompt "".
"""

import numpy as np

from ldm_jax.errors import check

TOKENIZERS = ("shapes-words",)


def is_text(data_config) -> bool:
  """True when the run is conditioned on text (data.tokenizer is set)."""
  return bool(data_config.get("tokenizer", ""))


def tokenizer_for(data_config):
  """The tokenizer `data.tokenizer` names (see the module docstring)."""
  name = data_config.get("tokenizer", "")
  check(name in TOKENIZERS, f"unknown data.tokenizer {name!r}; valid: {list(TOKENIZERS)}")
  from ldm_jax.data.word_tokenizer import WordTokenizer  # pylint: disable=import-outside-toplevel
  return WordTokenizer.for_shapes(max_length=int(data_config.get("max_tokens", 12)))


def prompt_condition(data_config, prompts) -> dict:
  """{"tokens": int32 (B, L)} of a list of prompts (truncation is logged)."""
  ids, _, _ = tokenizer_for(data_config)(list(prompts))
  return {"tokens": np.asarray(ids, np.int32)}


def null_condition(data_config) -> dict:
  """The empty prompt's condition, one example: {"tokens": int32 (L,)}."""
  return {key: value[0] for key, value in prompt_condition(data_config, [""]).items()}


def condition_struct(data_config, batch: int) -> dict:
  """Shapes and dtypes of a batch's text condition (for ahead-of-time lowering)."""
  return {"tokens": ((batch, int(data_config.get("max_tokens", 12))), np.int32)}
