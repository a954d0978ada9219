"""SD3's text conditioning: CLIP-L + OpenCLIP-G + T5 -> (context, pooled).

As the SD3 paper (§2, Fig. 2) and diffusers' StableDiffusion3Pipeline assemble it:

  context = concat_seq( fit_to_T5_width( concat_width(CLIP-L h[-2], CLIP-G h[-2]) ),
                        T5 last hidden state )           (B, 77 + max_sequence_length, 4096)
  pooled  = concat_width(CLIP-L text_embeds, CLIP-G text_embeds)      (B, 768 + 1280)

h[-2] is the penultimate layer's output (`clip_skip` = k takes h[-(k + 2)]). Without a
T5 encoder the T5 part is zeros of (max_sequence_length, context width). The three
tokenizers pad to their own lengths (CLIP: the tokenizer's model_max_length, 77; T5:
max_sequence_length); prompts longer than that are truncated with a warning, as
diffusers does.
"""

import dataclasses
import hashlib
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.errors import check

MAX_T5_LENGTH = 512  # diffusers' limit on max_sequence_length for SD3


def assemble(clip_l_hidden, clip_g_hidden, t5_hidden, clip_l_pooled, clip_g_pooled):
  """(context, pooled) from the encoders' outputs (any array type with jnp semantics).

  Args:
    clip_l_hidden, clip_g_hidden: (B, L_clip, d_l), (B, L_clip, d_g) hidden states.
    t5_hidden: (B, L_t5, d_t5); its width is the context width (zeros if no T5).
    clip_l_pooled, clip_g_pooled: (B, p_l), (B, p_g) projected pooled outputs.
  Returns:
    context (B, L_clip + L_t5, d_t5), pooled (B, p_l + p_g).
  """
  clip = jnp.concatenate([clip_l_hidden, clip_g_hidden], axis=-1)
  width = t5_hidden.shape[-1]
  # Zero-padded to the T5 width; wider CLIP features are cut to it, which is what
  # diffusers' `F.pad` with a negative amount does (tiny test configs have that).
  clip = clip[..., :width]
  clip = jnp.pad(clip, ((0, 0), (0, 0), (0, width - clip.shape[-1])))
  context = jnp.concatenate([clip, t5_hidden.astype(clip.dtype)], axis=1)
  pooled = jnp.concatenate([clip_l_pooled, clip_g_pooled], axis=-1)
  return context, pooled


# The parts of a condition, by encoder: what `SD3TextStack.encode_parts` returns and a
# text-embedding cache stores. Per-encoder dropout (the SD3 paper drops each of the three
# encoders independently, 46.4 % each, so that any subset works at inference) replaces
# one encoder's parts at a time.
PART_KEYS = ("clip_l", "clip_g", "t5", "pooled_l", "pooled_g")
ENCODER_PARTS = {"clip_l": ("clip_l", "pooled_l"), "clip_g": ("clip_g", "pooled_g"),
                 "t5": ("t5",)}
# A fixed string whose token ids enter the stack's fingerprint (special tokens, merges
# and padding, not only the vocabulary).
_TOKENIZER_PROBE = "A photo of 2 cats, one Ärger-free; the other: 日本! <probe> x" * 2


def assemble_parts(parts) -> tuple:
  """(context, pooled) of `encode_parts`' dict (any array type with jnp semantics)."""
  return assemble(parts["clip_l"], parts["clip_g"], parts["t5"], parts["pooled_l"],
                  parts["pooled_g"])


def drop_encoders(parts: dict, null: dict, prob: float, key) -> dict:
  """Drops each text encoder independently: for every example and every encoder of
  ENCODER_PARTS, with probability `prob`, that encoder's parts are replaced by the
  null condition's (`null`: zeros — what leaving an encoder out at inference gives,
  e.g. SD3 without T5 — or the empty prompt's; see ldm_jax/data/text.py). All three
  dropped at once (prob³) is the unconditional input of classifier-free guidance.

  Args:
    parts: dict of PART_KEYS arrays with a leading batch axis.
    null: the same keys, one example each (no batch axis).
    prob: per-encoder drop probability.
    key: PRNG key.
  """
  batch = parts["clip_l"].shape[0]
  out = dict(parts)
  for i, keys in enumerate(ENCODER_PARTS.values()):
    drop = jax.random.bernoulli(jax.random.fold_in(key, i), prob, (batch,))
    for k in keys:
      value = parts[k]
      where = drop.reshape((-1,) + (1,) * (value.ndim - 1))
      out[k] = jnp.where(where, jnp.broadcast_to(null[k].astype(value.dtype), value.shape),
                         value)
  return out


@dataclasses.dataclass
class TextEncoder:
  """One encoder of the stack: its tokenizer, Flax module, params and jitted call."""
  tokenizer: Any
  module: Any
  params: Any
  kind: str  # "clip" | "t5"

  def __post_init__(self):
    self._apply = jax.jit(lambda p, ids: self.module.apply({"params": p}, ids))

  def __call__(self, ids: np.ndarray) -> dict:
    return self._apply(self.params, jnp.asarray(ids))


class SD3TextStack:
  """Tokenizers + CLIP-L, CLIP-G and (optionally) T5 -> SD3's (context, pooled).

  Attributes:
    clip_l, clip_g: `TextEncoder`s (kind "clip", with projection).
    t5: a `TextEncoder` (kind "t5") or None (its part of the context is zeros).
    context_dim: the context width (the transformer's joint_attention_dim).
    clip_length: the CLIP tokenizers' padded length (diffusers: tokenizer.model_max_length).
  """

  def __init__(self, clip_l: TextEncoder, clip_g: TextEncoder, t5: TextEncoder | None,
               context_dim: int, clip_length: int = 77):
    self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
    self.context_dim = int(context_dim)
    self.clip_length = int(clip_length)

  @property
  def pooled_dim(self) -> int:
    """Width of the pooled vector: the two CLIP projections."""
    return int(self.clip_l.module.projection_dim) + int(self.clip_g.module.projection_dim)

  def fingerprint(self, **settings) -> str:
    """sha256 of what decides the embeddings: every encoder weight, each tokenizer's
    vocabulary (its `get_vocab()`) and its ids of a fixed probe string (special
    tokens, merges, padding), the CLIP length, whether T5 is used, and `settings`
    (e.g. max_sequence_length, clip_skip). A text-embedding cache records it; sampling
    with another stack is refused. Computed once per stack and settings."""
    key = json.dumps(settings, sort_keys=True, default=str)
    memo = self.__dict__.setdefault("_fingerprints", {})
    if key not in memo:
      memo[key] = self._fingerprint(settings)
    return memo[key]

  def _fingerprint(self, settings: dict) -> str:
    # pylint: disable=import-outside-toplevel
    from ldm_jax.data.latents import vae_fingerprint
    encoders = {"clip_l": self.clip_l, "clip_g": self.clip_g}
    if self.t5 is not None:
      encoders["t5"] = self.t5
    config = dict(settings, clip_length=self.clip_length, context_dim=self.context_dim,
                  t5=self.t5 is not None)
    for name, encoder in encoders.items():
      vocab = encoder.tokenizer.get_vocab()
      config[f"{name}_vocab"] = hashlib.sha256(json.dumps(
          sorted(vocab.items()), separators=(",", ":")).encode()).hexdigest()
      probe = encoder.tokenizer([_TOKENIZER_PROBE, ""], padding="max_length", max_length=48,
                                truncation=True)["input_ids"]
      config[f"{name}_probe"] = [list(map(int, ids)) for ids in probe]
    return vae_fingerprint({k: e.params for k, e in encoders.items()}, config)

  def encode(self, prompts: Sequence[str], prompts_2: Sequence[str] | None = None,
             prompts_3: Sequence[str] | None = None, *, max_sequence_length: int = 256,
             clip_skip: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(context (B, clip_length + max_sequence_length, context_dim), pooled (B, p)).

    `prompts_2` goes to CLIP-G and `prompts_3` to T5; each defaults to `prompts`.
    """
    return assemble_parts(self.encode_parts(
        prompts, prompts_2, prompts_3, max_sequence_length=max_sequence_length,
        clip_skip=clip_skip))

  def encode_parts(self, prompts: Sequence[str], prompts_2: Sequence[str] | None = None,
                   prompts_3: Sequence[str] | None = None, *, max_sequence_length: int = 256,
                   clip_skip: int | None = None) -> dict:
    """Each encoder's share of the condition, before `assemble` (PART_KEYS): clip_l
    (B, clip_length, d_l), clip_g (B, clip_length, d_g), t5 (B, max_sequence_length,
    context_dim; zeros without T5), pooled_l (B, p_l), pooled_g (B, p_g). A
    text-embedding cache stores these, so that training can drop each encoder on
    its own (`drop_encoders`)."""
    # pylint: disable=import-outside-toplevel
    from ldm_jax.data.tokenizers import check_ids, tokenize
    # As diffusers (`prompt_2 or prompt`): None, "" and [] all fall back to `prompts`.
    prompts = list(prompts)
    prompts_2 = list(prompts_2) if prompts_2 else prompts
    prompts_3 = list(prompts_3) if prompts_3 else prompts
    check(len(prompts_2) == len(prompts) and len(prompts_3) == len(prompts),
          f"SD3 text: {len(prompts)} prompts but {len(prompts_2)} prompt_2 and "
          f"{len(prompts_3)} prompt_3; give as many of each (or None)")
    check(1 <= max_sequence_length <= MAX_T5_LENGTH,
          f"max_sequence_length={max_sequence_length} must be between 1 and {MAX_T5_LENGTH}")
    hidden, pooled = [], []
    for encoder, texts, name in ((self.clip_l, prompts, "text_encoder (CLIP-L)"),
                                 (self.clip_g, prompts_2, "text_encoder_2 (CLIP-G)")):
      ids, _ = tokenize(encoder.tokenizer, texts, self.clip_length)
      check_ids(ids, encoder.module.vocab_size, name)
      out = encoder(ids)
      states = out["hidden_states"]
      layer = -2 if clip_skip is None else -(int(clip_skip) + 2)
      check(-len(states) <= layer, f"clip_skip={clip_skip} exceeds the CLIP depth "
            f"({len(states) - 2} is the most)")
      hidden.append(states[layer])
      pooled.append(out["text_embeds"])
    batch = len(prompts)
    if self.t5 is None:
      t5_hidden = jnp.zeros((batch, max_sequence_length, self.context_dim), hidden[0].dtype)
    else:
      ids, _ = tokenize(self.t5.tokenizer, prompts_3, max_sequence_length)
      check_ids(ids, self.t5.module.vocab_size, "text_encoder_3 (T5)")
      t5_hidden = self.t5(ids)["last_hidden_state"]
    check(t5_hidden.shape[-1] == self.context_dim,
          f"SD3 text: T5 width {t5_hidden.shape[-1]} differs from the transformer's "
          f"joint_attention_dim {self.context_dim}")
    return {"clip_l": hidden[0], "clip_g": hidden[1], "t5": t5_hidden,
            "pooled_l": pooled[0], "pooled_g": pooled[1]}
