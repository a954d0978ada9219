"""A word-level tokenizer for small closed-vocabulary captions (e.g. the built-in
captioned shapes, ldm_jax.data.shapes), saved as JSON next to a checkpoint.

Text is lower-cased, split on whitespace, and the punctuation .,;:!? is stripped
from both ends of each word (empty words are dropped). Ids: pad 0, bos 1, eos 2,
unk 3, then the vocabulary's words in order (4, 5, ...). A prompt becomes
[bos, words..., eos] right-padded with pad to `max_length`; a prompt with more
than max_length - 2 words is truncated (its first max_length - 2 words are kept,
eos still ends it) and what was cut is reported (as in ldm_jax.data.tokenizers:
truncated[i] is the removed text of prompt i, "" when nothing, and a warning is
logged through absl logging). Words not in the vocabulary become unk and are
reported (per prompt, and in a warning; with strict=True a UserError names them).
"""

import json
import os
from typing import NamedTuple

import numpy as np
from absl import logging

from ldm_jax.data.shapes import COLOURS, KINDS, RELATIONS, normalise_words
from ldm_jax.errors import UserError, check

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
FILE_NAME = "word_tokenizer.json"
FORMAT = "ldm_jax.word_tokenizer"
VERSION = 1


def _shapes_vocab() -> list[str]:
  words = ["a", *COLOURS, *KINDS]
  for relation in RELATIONS:
    words += [w for w in relation.split() if w not in words]
  return words


# The words of the captioned-shapes grammar: a, colours, kinds, left, of, right,
# above, below.
SHAPES_VOCAB = tuple(_shapes_vocab())


class Encoding(NamedTuple):
  """A tokenized batch.

  ids: int32 (B, max_length); attention_mask: int32 (B, max_length), 1 on bos, words
  and eos, 0 on padding; truncated: per prompt, the (normalised) words truncation
  removed, joined by spaces ("" when nothing); unknown: per prompt, the words
  mapped to unk.
  """
  ids: np.ndarray
  attention_mask: np.ndarray
  truncated: list[str]
  unknown: list[list[str]]


class WordTokenizer:
  """Whitespace word tokenizer over a fixed vocabulary (see the module docstring).

  Args:
    vocab: the words (distinct, lower case, no whitespace, not a special token).
    max_length: sequence length including bos and eos (>= 3).
  """

  def __init__(self, vocab, max_length: int):
    vocab = [str(w) for w in vocab]
    check(len(vocab) > 0, "WordTokenizer needs a non-empty vocabulary")
    bad = [w for w in vocab if normalise_words(w) != [w] or w in SPECIAL_TOKENS]
    check(not bad, f"WordTokenizer vocabulary words {bad} are not lower-case single words "
          f"without edge punctuation, or are special tokens {list(SPECIAL_TOKENS)}")
    duplicates = sorted({w for w in vocab if vocab.count(w) > 1})
    check(not duplicates, f"WordTokenizer vocabulary repeats {duplicates}")
    check(int(max_length) >= 3, f"WordTokenizer max_length={max_length} must be >= 3 "
          "(bos, at least one word, eos)")
    self.vocab = vocab
    self.max_length = int(max_length)
    self._ids = {w: i + len(SPECIAL_TOKENS) for i, w in enumerate(vocab)}

  @property
  def vocab_size(self) -> int:
    """Number of ids, special tokens included."""
    return len(SPECIAL_TOKENS) + len(self.vocab)

  def encode(self, prompts, strict: bool = False) -> Encoding:
    """Tokenizes a prompt or a list of prompts; logs a warning for truncated prompts
    and unknown words (or, with `strict`, raises a UserError for unknown words)."""
    if isinstance(prompts, str):
      prompts = [prompts]
    prompts = list(prompts)
    keep = self.max_length - 2
    ids = np.full((len(prompts), self.max_length), PAD, np.int32)
    mask = np.zeros((len(prompts), self.max_length), np.int32)
    truncated, unknown = [], []
    for row, prompt in enumerate(prompts):
      words = normalise_words(prompt)
      unknown.append([w for w in words if w not in self._ids])
      truncated.append(" ".join(words[keep:]))
      tokens = [BOS, *(self._ids.get(w, UNK) for w in words[:keep]), EOS]
      ids[row, :len(tokens)] = tokens
      mask[row, :len(tokens)] = 1
    missing = sorted({w for words in unknown for w in words})
    if missing:
      message = (f"words {missing} are not in the tokenizer's vocabulary "
                 f"{self.vocab} (prompts: {[p for p, u in zip(prompts, unknown) if u]})")
      if strict:
        raise UserError(message)
      logging.warning("%s; they are encoded as <unk>", message)
    for prompt, cut in zip(prompts, truncated):
      if cut:
        logging.warning("prompt %r is longer than the word tokenizer's max_length=%d "
                        "tokens; this part was truncated: %r", prompt, self.max_length, cut)
    return Encoding(ids, mask, truncated, unknown)

  def __call__(self, prompts, strict: bool = False
               ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(ids int32 (B, max_length), attention_mask int32 (B, max_length), truncated:
    per prompt the text truncation removed, "" when nothing); `encode` also gives the
    unknown words."""
    encoding = self.encode(prompts, strict)
    return encoding.ids, encoding.attention_mask, encoding.truncated

  def decode(self, ids) -> list[str]:
    """Text of id rows (special tokens dropped, unk shown as <unk>)."""
    words = [*SPECIAL_TOKENS, *self.vocab]
    rows = np.atleast_2d(np.asarray(ids))
    return [" ".join(words[i] for i in row if i not in (PAD, BOS, EOS)) for row in rows]

  def save(self, folder: str) -> str:
    """Writes FOLDER/word_tokenizer.json; returns its path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, FILE_NAME)
    with open(path, "w", encoding="utf-8") as f:
      json.dump({"format": FORMAT, "version": VERSION, "special_tokens": list(SPECIAL_TOKENS),
                 "max_length": self.max_length, "vocab": self.vocab}, f, indent=1)
    return path

  @classmethod
  def load(cls, folder: str) -> "WordTokenizer":
    """Reads FOLDER/word_tokenizer.json written by `save`."""
    path = os.path.join(folder, FILE_NAME)
    check(os.path.isfile(path), f"no word tokenizer at {path!r} (written by WordTokenizer.save)")
    try:
      with open(path, encoding="utf-8") as f:
        data = json.load(f)
    except (OSError, ValueError) as e:
      raise UserError(f"word tokenizer file {path!r} is not valid JSON: {e}") from e
    check(isinstance(data, dict) and data.get("format") == FORMAT
          and data.get("version") == VERSION
          and data.get("special_tokens") == list(SPECIAL_TOKENS),
          f"{path!r} is not a {FORMAT} version {VERSION} file")
    return cls(data["vocab"], data["max_length"])

  @classmethod
  def for_shapes(cls, max_length: int = 12) -> "WordTokenizer":
    """The tokenizer of the captioned-shapes grammar (longest caption: 8 words + bos + eos)."""
    return cls(SHAPES_VOCAB, max_length)
