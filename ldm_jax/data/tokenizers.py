"""Prompt tokenization for the text encoders, with transformers' tokenizers read from
LOCAL folders only (e.g. an SD3 pipeline's tokenizer/, tokenizer_2/, tokenizer_3/).

`tokenize` produces exactly the ids diffusers' SD3 pipeline feeds its encoders
(padding to `max_length`, truncation, the tokenizer's special tokens: CLIP
<|startoftext|> ... <|endoftext|>, T5 ... </s>) and reports what truncation cut.
transformers is imported only when a tokenizer is loaded.
"""

import os

import numpy as np
from absl import logging

from ldm_jax.errors import UserError, check

KINDS = ("clip", "t5")
# Files any one of which (all of a tuple) makes a folder a tokenizer of that kind.
EXPECTED_FILES = {"clip": (("tokenizer.json",), ("vocab.json", "merges.txt")),
                  "t5": (("tokenizer.json",), ("spiece.model",))}
_CLASSES = {"clip": "CLIPTokenizer", "t5": "T5Tokenizer"}
MIN_VOCAB = 10  # smaller "tokenizers" are placeholders (transformers' offline fallback: 2)


def _expected(kind: str) -> str:
  return " or ".join(" + ".join(files) for files in EXPECTED_FILES[kind])


def load_tokenizer(folder: str, *, kind: str, model_vocab_size: int | None = None):
  """A transformers tokenizer from a local folder, never the hub.

  Args:
    folder: the tokenizer folder (tokenizer_config.json plus the files in
      EXPECTED_FILES[kind]).
    kind: "clip" (CLIPTokenizer) or "t5" (T5Tokenizer).
    model_vocab_size: the text encoder's vocabulary size. A tokenizer may have more
      entries than the encoder has rows (diffusers' own tiny test pipelines pair a
      32,100-entry T5 tokenizer with a 1,000-row encoder); ids beyond it are an error
      when a prompt produces them (`check_ids`).
  Raises:
    UserError: missing folder or tokenizer files, a tokenizer transformers cannot
      read, or one with fewer than MIN_VOCAB entries.
  """
  check(kind in KINDS, f"tokenizer kind {kind!r}; valid: {list(KINDS)}")
  folder = os.fspath(folder)
  check(os.path.isdir(folder), f"tokenizer folder {folder} does not exist (expected a local "
        f"folder holding {_expected(kind)}; tokenizers are never downloaded)")
  present = set(os.listdir(folder))
  check(any(set(files) <= present for files in EXPECTED_FILES[kind]),
        f"tokenizer folder {folder} has no {kind} tokenizer files: expected {_expected(kind)} "
        f"(found: {sorted(present) or 'nothing'})")
  import transformers  # pylint: disable=import-outside-toplevel
  cls = getattr(transformers, _CLASSES[kind])
  try:
    tokenizer = cls.from_pretrained(folder, local_files_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"cannot load a {_CLASSES[kind]} from {folder}: {e}") from e
  size = len(tokenizer)
  check(size >= MIN_VOCAB, f"tokenizer in {folder} has only {size} entries (fewer than "
        f"{MIN_VOCAB}): not a real {kind} tokenizer; check the folder's files")
  del model_vocab_size  # checked per prompt: check_ids
  return tokenizer


def check_ids(ids: np.ndarray, vocab_size: int, what: str) -> None:
  """UserError if token ids reach past the encoder's `vocab_size` rows (PyTorch would
  fail on them; a gather in JAX would silently clamp)."""
  if ids.size:
    top = int(ids.max())
    check(top < vocab_size, f"{what}: the tokenizer produced id {top} but the text encoder "
          f"has only {vocab_size} rows (a tokenizer that does not belong to this encoder?)")


def tokenize(tokenizer, prompts: list[str], max_length: int) -> tuple[np.ndarray, list[str]]:
  """Token ids for `prompts` as diffusers' SD3 pipeline makes them, and what was cut.

  Args:
    tokenizer: from `load_tokenizer`.
    prompts: the prompts (strings).
    max_length: length every row is padded / truncated to (77 for CLIP, SD3's
      max_sequence_length for T5).
  Returns:
    (ids, truncated): ids int32 (len(prompts), max_length); truncated[i] is the
    decoded text truncation removed from prompt i ("" when nothing). Each cut is
    also logged as a warning.
  """
  check(isinstance(prompts, (list, tuple)) and all(isinstance(p, str) for p in prompts),
        f"prompts must be a list of strings, got {type(prompts).__name__}")
  specials = tokenizer.num_special_tokens_to_add(pair=False)
  check(isinstance(max_length, (int, np.integer)) and max_length >= 1,
        f"max_length {max_length!r} must be an integer >= 1")
  prompts = list(prompts)
  if not prompts:
    return np.zeros((0, max_length), np.int32), []
  encoded = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                      add_special_tokens=True)["input_ids"]
  ids = np.asarray(encoded, dtype=np.int32)
  check(ids.shape == (len(prompts), max_length), f"tokenizer gave shape {ids.shape}, "
        f"expected {(len(prompts), max_length)}")
  bodies = tokenizer(prompts, add_special_tokens=False, truncation=False, padding=False,
                     verbose=False)["input_ids"]
  truncated = []
  for i, body in enumerate(bodies):
    cut = list(body[max(0, max_length - specials):])
    text = tokenizer.decode(cut, skip_special_tokens=False) if cut else ""
    truncated.append(text)
    if cut:
      logging.warning("Prompt %d is longer than the text encoder's %d tokens; this part was "
                      "truncated (%d tokens): %r", i, max_length, len(cut), text)
  return ids, truncated
