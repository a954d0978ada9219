"""Small but real tokenizer folders for tests (no network): a byte-level BPE CLIP
tokenizer and a Unigram T5 tokenizer that transformers loads offline.

  write_clip_tokenizer(folder, pad_token="<|endoftext|>")  # SD3 tokenizer_2: pad_token="!"
  write_t5_tokenizer(folder)

The CLIP vocabulary follows CLIP's layout: the 256 byte symbols of GPT-2's
byte-to-unicode table (so "!" is id 0), the same with the end-of-word mark "</w>",
the merge results, then <|startoftext|> and <|endoftext|> last. The T5 one is a
Unigram model over <pad> (0), </s> (1), <unk> (2), "▁"-prefixed words and single
characters, plus 100 <extra_id_i> sentinels, as T5's SentencePiece model has.
"""

import json
import os

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
# Words the BPE merges below build whole (each a single token with "</w>").
CLIP_WORDS = ("a", "photo", "of", "cat", "dog", "the", "on", "red", "blue", "sitting", "mat",
              "in", "garden", "painting")
T5_WORDS = ("a", "photo", "of", "cat", "dog", "the", "on", "red", "blue", "sitting", "mat",
            "in", "garden", "painting", "an", "and", "with", "green", "house", "tree")
T5_EXTRA_IDS = 100


def byte_symbols() -> list[str]:
  """The 256 printable stand-ins of GPT-2 / CLIP byte-level BPE, in vocabulary order:
  bytes that are printable Latin-1 stand for themselves (in byte order), the others
  get code points 256, 257, ... (also in byte order), appended after them."""
  printable = [b for b in range(256)
               if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
  others = [b for b in range(256) if b not in set(printable)]
  return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def _write_json(obj, path: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, ensure_ascii=False, indent=2)


def _clip_merges() -> list[tuple[str, str]]:
  """Left-to-right merges that assemble each word of CLIP_WORDS (with "</w>")."""
  merges: list[tuple[str, str]] = []
  for word in CLIP_WORDS:
    if len(word) == 1:
      continue
    left = word[0]
    for i, ch in enumerate(word[1:], 1):
      right = ch + "</w>" if i == len(word) - 1 else ch
      if (left, right) not in merges:
        merges.append((left, right))
      left += right
  return merges


def write_clip_tokenizer(folder: str, pad_token: str = CLIP_EOS) -> str:
  """Writes vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json
  of a CLIP BPE tokenizer (model_max_length 77) into `folder`; returns `folder`.

  Args:
    pad_token: "<|endoftext|>" (OpenAI CLIP-L as SD3's `tokenizer`) or "!" (id 0,
      OpenCLIP bigG as SD3's `tokenizer_2`).
  """
  os.makedirs(folder, exist_ok=True)
  symbols = byte_symbols()
  tokens = symbols + [s + "</w>" for s in symbols]
  merges = _clip_merges()
  for left, right in merges:
    if left + right not in tokens:
      tokens.append(left + right)
  tokens += [CLIP_BOS, CLIP_EOS]
  _write_json({t: i for i, t in enumerate(tokens)}, os.path.join(folder, "vocab.json"))
  with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  special = dict(bos_token=CLIP_BOS, eos_token=CLIP_EOS, unk_token=CLIP_EOS, pad_token=pad_token)
  _write_json(special, os.path.join(folder, "special_tokens_map.json"))
  _write_json(dict(special, tokenizer_class="CLIPTokenizer", model_max_length=77,
                   do_lower_case=True, errors="replace", add_prefix_space=False,
                   clean_up_tokenization_spaces=False),
              os.path.join(folder, "tokenizer_config.json"))
  return folder


def _t5_vocab() -> list[tuple[str, float]]:
  chars = ([chr(c) for c in range(ord("a"), ord("z") + 1)]
           + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
           + [str(d) for d in range(10)] + list(".,!?'\"-:;()"))
  vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
  vocab += [("\u2581" + w, -4.0 - 0.01 * i) for i, w in enumerate(T5_WORDS)]
  vocab += [("\u2581" + c, -8.0) for c in chars]
  vocab += [(c, -9.0) for c in chars]
  # Two-letter pieces so unknown words split into something shorter than letters.
  pairs = [a + b for a in "aeiost" for b in "nrtlsd"]
  vocab += [(p, -8.5) for p in pairs]
  return vocab


def write_t5_tokenizer(folder: str) -> str:
  """Writes tokenizer.json (Unigram, "</s>" appended to every sequence),
  tokenizer_config.json and special_tokens_map.json of a T5-style tokenizer
  (model_max_length 512) into `folder`; returns `folder`."""
  from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
  from tokenizers.models import Unigram
  os.makedirs(folder, exist_ok=True)
  vocab = _t5_vocab()
  tok = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
  tok.normalizer = normalizers.Sequence([normalizers.Replace(" {2,}", " ")])
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.WhitespaceSplit(),
      pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)])
  tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
  tok.post_processor = processors.TemplateProcessing(
      single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)])
  extra = [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS - 1, -1, -1)]
  tok.add_special_tokens([AddedToken(t, special=True) for t in ("<pad>", "</s>", "<unk>")])
  tok.add_special_tokens([AddedToken(t, special=True) for t in extra])
  tok.save(os.path.join(folder, "tokenizer.json"))
  special = dict(eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                 additional_special_tokens=sorted(extra, key=lambda t: int(t[10:-1])))
  _write_json(special, os.path.join(folder, "special_tokens_map.json"))
  _write_json(dict(special, tokenizer_class="T5Tokenizer", model_max_length=512,
                   extra_ids=T5_EXTRA_IDS, clean_up_tokenization_spaces=True),
              os.path.join(folder, "tokenizer_config.json"))
  return folder
