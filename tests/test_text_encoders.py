"""CLIP / T5 text encoders: parity with transformers' PyTorch models through saved
folders, export round trips, parameter counts of the real variants, tokenizers."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config,
                          T5EncoderModel)

from ldm_jax.convert import common
from ldm_jax.convert import text_encoders as cte
from ldm_jax.data import tokenizers as tok
from ldm_jax.errors import UserError
from ldm_jax.models import text_encoders as te
from ldm_jax.models.registry import count_params
from tests.tokenizer_fixtures import write_clip_tokenizer, write_t5_tokenizer

TOL = 1e-5
VOCAB = 99


def rel_err(ours, ref) -> float:
  ref = np.asarray(ref.detach().numpy() if isinstance(ref, torch.Tensor) else ref, np.float64)
  return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


def _randomise(model, seed: int):
  """Non-trivial norm weights/biases too (transformers initialises them to 1 / 0)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.2 * torch.randn(p.shape, generator=gen))
  return model.eval()


def _same_state(a, b):
  sa, sb = a.state_dict(), b.state_dict()
  assert sorted(sa) == sorted(sb)
  for k in sa:
    assert torch.equal(sa[k], sb[k]), k


def _clip_ids(eos: int, legacy: bool):
  """Two rows of 12: a short prompt padded with its end token after it, and a full
  one. Legacy configs (eos_token_id 2) pool at the largest id, which real CLIP
  vocabularies give the end token: VOCAB - 1 plays that part."""
  gen = np.random.default_rng(0)
  end = VOCAB - 1 if legacy else eos
  ids = gen.integers(3, VOCAB - 1, size=(2, 12))
  ids[ids == eos] = 3
  ids[:, 0] = 1  # bos
  ids[0, 7:] = end
  ids[1, 11] = end
  return ids


@pytest.mark.parametrize("act,legacy,projection,masked", [
    ("quick_gelu", True, True, False), ("gelu", False, True, True),
    ("gelu_new", False, False, False)])
def test_clip_parity_and_round_trip(tmp_path, act, legacy, projection, masked):
  eos = 2 if legacy else 5
  cfg = CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=16,
                       projection_dim=24, hidden_act=act, eos_token_id=eos, bos_token_id=1,
                       pad_token_id=eos)
  torch.manual_seed(0)
  cls = CLIPTextModelWithProjection if projection else CLIPTextModel
  ref_model = _randomise(cls(cfg), 1)
  ref_model.save_pretrained(tmp_path / "ref")
  module, params = cte.load_text_encoder(tmp_path / "ref")
  assert isinstance(module, te.CLIPTextEncoder) and module.hidden_act == act
  assert module.eos_token_id == eos and module.projection_dim == (24 if projection else None)

  ids = _clip_ids(eos, legacy)
  mask = np.ones_like(ids)
  if masked:
    mask[0, 9:] = 0
  with torch.no_grad():
    ref = ref_model(torch.tensor(ids), attention_mask=torch.tensor(mask) if masked else None,
                    output_hidden_states=True)
  out = module.apply({"params": params}, jnp.asarray(ids, jnp.int32),
                     jnp.asarray(mask) if masked else None)
  assert len(out["hidden_states"]) == len(ref.hidden_states) == 4
  errs = {"hidden_states[-2]": rel_err(out["hidden_states"][-2], ref.hidden_states[-2]),
          "hidden_states[-1]": rel_err(out["hidden_states"][-1], ref.hidden_states[-1]),
          "last_hidden_state": rel_err(out["last_hidden_state"], ref.last_hidden_state)}
  if projection:
    errs["text_embeds"] = rel_err(out["text_embeds"], ref.text_embeds)
  else:
    errs["pooled"] = rel_err(out["pooled"], ref.pooler_output)
    assert "text_embeds" not in out
  assert max(errs.values()) <= TOL, errs
  # The pooled token is the one transformers picks: row 0 pools at position 7.
  np.testing.assert_array_equal(np.asarray(out["pooled"][0]),
                                np.asarray(out["last_hidden_state"][0, 7]))

  cte.save_text_encoder(module, params, tmp_path / "ours")
  back = cls.from_pretrained(tmp_path / "ours", local_files_only=True).eval()
  _same_state(back, ref_model)
  assert back.config.eos_token_id == eos and back.config.hidden_act == act


def _t5(feed_forward_proj: str, seed: int = 0) -> T5EncoderModel:
  cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=6, d_ff=40, num_layers=3, num_heads=4,
                 relative_attention_num_buckets=8, relative_attention_max_distance=7,
                 feed_forward_proj=feed_forward_proj, layer_norm_epsilon=1e-6,
                 dropout_rate=0.0)
  torch.manual_seed(seed)
  model = _randomise(T5EncoderModel(cfg), seed + 1)
  with torch.no_grad():  # bias values large enough to matter
    model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.mul_(50.0)
  return model


@pytest.mark.parametrize("ff,sharded", [("gated-gelu", True), ("relu", False)])
def test_t5_parity_and_round_trip(tmp_path, ff, sharded):
  ref_model = _t5(ff)
  ref_model.save_pretrained(tmp_path / "ref", max_shard_size="20KB" if sharded else "5GB")
  files = os.listdir(tmp_path / "ref")
  assert ("model.safetensors.index.json" in files) == sharded, files
  module, params = cte.load_text_encoder(tmp_path / "ref")
  assert isinstance(module, te.T5Encoder) and module.feed_forward_proj == ff

  length = 20  # > max distance 7: the log-spaced and clipped buckets are all used
  ids = np.random.default_rng(1).integers(2, VOCAB, size=(2, length))
  mask = np.ones_like(ids)
  mask[1, 13:] = 0
  for m in (None, mask):
    with torch.no_grad():
      ref = ref_model(torch.tensor(ids), attention_mask=None if m is None else torch.tensor(m),
                      output_hidden_states=True)
    out = module.apply({"params": params}, jnp.asarray(ids, jnp.int32),
                       None if m is None else jnp.asarray(m))
    err = rel_err(out["last_hidden_state"], ref.last_hidden_state)
    assert err <= TOL, (m is not None, err)
    assert len(out["hidden_states"]) == len(ref.hidden_states) == 4
    assert rel_err(out["hidden_states"][1], ref.hidden_states[1]) <= TOL
  # The mask changes the padded row's outputs (so the masked comparison tested it).
  unmasked = module.apply({"params": params}, jnp.asarray(ids, jnp.int32))
  assert float(jnp.max(jnp.abs(unmasked["last_hidden_state"][1, :13]
                               - out["last_hidden_state"][1, :13]))) > 1e-3

  cte.save_text_encoder(module, params, tmp_path / "ours")
  _same_state(T5EncoderModel.from_pretrained(tmp_path / "ours", local_files_only=True),
              ref_model)


def test_t5_buckets_match_transformers():
  bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
  for length, buckets, distance in ((600, 32, 128), (40, 8, 7), (300, 32, 20)):
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    ref = bucket(rel, bidirectional=True, num_buckets=buckets, max_distance=distance).numpy()
    np.testing.assert_array_equal(te.t5_relative_buckets(length, buckets, distance), ref)


def test_t5_tied_embedding_copies(tmp_path):
  """Files from older transformers hold shared.weight and encoder.embed_tokens.weight."""
  ref_model = _t5("gated-gelu")
  ref_model.save_pretrained(tmp_path / "ref")
  tensors = common.load_safetensors(str(tmp_path / "ref"), stem="model")
  legacy = tmp_path / "legacy"
  legacy.mkdir()
  (legacy / "config.json").write_text((tmp_path / "ref" / "config.json").read_text())
  both = dict(tensors, **{"encoder.embed_tokens.weight": tensors["shared.weight"]})
  common.save_safetensors(both, str(legacy / "model.safetensors"))
  _, params = cte.load_text_encoder(legacy)
  np.testing.assert_array_equal(params["shared"]["embedding"], tensors["shared.weight"])
  both["encoder.embed_tokens.weight"] = both["encoder.embed_tokens.weight"] + 1
  common.save_safetensors(both, str(legacy / "model.safetensors"))
  with pytest.raises(UserError, match="copies differ"):
    cte.load_text_encoder(legacy)


def test_clip_legacy_prefix_and_buffer(tmp_path):
  """CLIPTextModel files written by transformers < 5 keep `text_model.` and the
  position_ids buffer; transformers 5 reads our `text_model.` layout back."""
  cfg = CLIPTextConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24,
                       num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8)
  torch.manual_seed(0)
  ref_model = CLIPTextModel(cfg).eval()
  ref_model.save_pretrained(tmp_path / "ref")
  tensors = common.load_safetensors(str(tmp_path / "ref"), stem="model")
  old = {f"text_model.{k}": v for k, v in tensors.items()}
  old["text_model.embeddings.position_ids"] = np.arange(8, dtype=np.int64)[None]
  legacy = tmp_path / "legacy"
  legacy.mkdir()
  (legacy / "config.json").write_text((tmp_path / "ref" / "config.json").read_text())
  common.save_safetensors(old, str(legacy / "model.safetensors"))
  module, params = cte.load_text_encoder(legacy)
  assert module.projection_dim is None
  cte.save_text_encoder(module, params, tmp_path / "ours")
  _same_state(CLIPTextModel.from_pretrained(tmp_path / "ours", local_files_only=True), ref_model)
  old["text_model.embeddings.position_ids"] = old["text_model.embeddings.position_ids"][:, ::-1]
  common.save_safetensors(old, str(legacy / "model.safetensors"))
  with pytest.raises(UserError, match="position_ids"):
    cte.load_text_encoder(legacy)


def test_loader_errors(tmp_path):
  with pytest.raises(UserError, match="no such folder"):
    cte.load_text_encoder(tmp_path / "absent")
  with pytest.raises(UserError, match="no config.json"):
    cte.load_text_encoder(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"],
                                                    "model_type": "bert"}))
  with pytest.raises(UserError, match="not a supported text encoder"):
    cte.load_text_encoder(tmp_path)
  # A strict table: an extra tensor is named.
  ref = _t5("relu")
  ref.save_pretrained(tmp_path / "t5")
  tensors = common.load_safetensors(str(tmp_path / "t5"), stem="model")
  tensors["encoder.block.0.layer.0.SelfAttention.extra.weight"] = np.zeros((2,), np.float32)
  common.save_safetensors(tensors, str(tmp_path / "t5" / "model.safetensors"))
  with pytest.raises(UserError, match="unused: encoder.block.0.layer.0.SelfAttention.extra"):
    cte.load_text_encoder(tmp_path / "t5")


def test_param_counts_match_transformers():
  for name in ("clip-l-14", "clip-g-14", "t5-v1_1-xxl", "tiny-clip", "tiny-t5"):
    module = te.build(name)
    ours = count_params(te.param_shapes(module))
    cfg = cte.config_to_transformers(te.config_of(module))
    t5 = cfg["model_type"] == "t5"
    with torch.device("meta"):
      ref = (T5EncoderModel(T5Config(**cfg)) if t5
             else CLIPTextModelWithProjection(CLIPTextConfig(**cfg)))
    assert ours == sum(p.numel() for p in ref.parameters()), name
    if name in te.PARAM_COUNTS:
      assert ours == te.PARAM_COUNTS[name], (name, ours)
    assert cte.config_from_transformers(cfg) == te.config_of(module)
  assert te.PARAM_COUNTS == {"clip-l-14": 123_650_304, "clip-g-14": 694_659_840,
                             "t5-v1_1-xxl": 4_762_310_656}


def test_every_parameter_has_logical_axes():
  for name in ("tiny-clip", "tiny-t5"):
    boxed = te.param_shapes(te.build(name))
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: hasattr(x, "names"))
    assert leaves and all(hasattr(x, "names") and len(x.names) == len(x.value.shape)
                          for x in leaves), name


def test_build_errors():
  with pytest.raises(UserError, match="unknown text encoder variant"):
    te.build("clip-h")
  with pytest.raises(UserError, match="unknown fields"):
    te.build("tiny-t5", hidden_size=3)
  with pytest.raises(UserError, match="feed_forward_proj"):
    te.t5_feed_forward("double-gated-gelu")
  with pytest.raises(UserError, match="unknown activation"):
    te.build("tiny-clip", hidden_act="mish").init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


def test_load_tokenizer_errors(tmp_path):
  with pytest.raises(UserError, match="does not exist.*vocab.json \\+ merges.txt"):
    tok.load_tokenizer(str(tmp_path / "absent"), kind="clip")
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "README.md").write_text("x")
  with pytest.raises(UserError, match="no t5 tokenizer files.*spiece.model.*README.md"):
    tok.load_tokenizer(str(tmp_path / "empty"), kind="t5")
  with pytest.raises(UserError, match="kind"):
    tok.load_tokenizer(str(tmp_path), kind="bert")
  # A tiny vocabulary is refused, as is one larger than the model's.
  small = tmp_path / "small"
  small.mkdir()
  (small / "vocab.json").write_text(json.dumps({"a</w>": 0, "<|startoftext|>": 1,
                                                "<|endoftext|>": 2}))
  (small / "merges.txt").write_text("#version: 0.2\n")
  with pytest.raises(UserError, match="only 3 entries"):
    tok.load_tokenizer(str(small), kind="clip")
  # A tokenizer larger than the encoder loads (diffusers' tiny test pipelines have such
  # pairs); ids past the encoder's rows are refused when a prompt produces them.
  folder = write_clip_tokenizer(str(tmp_path / "clip"))
  clip = tok.load_tokenizer(folder, kind="clip", model_vocab_size=500)
  ids, _ = tok.tokenize(clip, ["a photo"], 77)
  tok.check_ids(ids, int(ids.max()) + 1, "CLIP-L")
  with pytest.raises(UserError, match=f"produced id {int(ids.max())} but the text encoder "
                     f"has only {int(ids.max())} rows"):
    tok.check_ids(ids, int(ids.max()), "CLIP-L")


def test_tokenize_like_diffusers(tmp_path, monkeypatch):
  clip = tok.load_tokenizer(write_clip_tokenizer(str(tmp_path / "clip")), kind="clip",
                            model_vocab_size=49408)
  clip_g = tok.load_tokenizer(write_clip_tokenizer(str(tmp_path / "clip_g"), pad_token="!"),
                              kind="clip")
  t5 = tok.load_tokenizer(write_t5_tokenizer(str(tmp_path / "t5")), kind="t5",
                          model_vocab_size=32128)
  assert clip.model_max_length == 77 and len(clip) >= 300 and len(t5) >= 300
  assert clip_g.pad_token_id == 0 and clip.pad_token_id == clip.eos_token_id
  long_prompt = "a photo of a cat sitting on the red mat in the garden"
  prompts = ["a red cat", long_prompt]
  warnings = []
  monkeypatch.setattr(tok.logging, "warning", lambda msg, *a: warnings.append(msg % a))
  for tokenizer, length, specials in ((clip, 8, 2), (clip_g, 8, 2), (t5, 6, 1)):
    ids, cut = tok.tokenize(tokenizer, prompts, length)
    ref = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                    add_special_tokens=True, return_tensors="np").input_ids
    assert ids.dtype == np.int32 and ids.shape == (2, length)
    np.testing.assert_array_equal(ids, ref)
    assert ids[0, -1] == tokenizer.pad_token_id and ids[1, -1] == tokenizer.eos_token_id
    # diffusers' removed text: the untruncated ids from max_length - 1, minus the eos.
    full = tokenizer([long_prompt], add_special_tokens=True).input_ids[0]
    assert cut[0] == ""
    assert cut[1] == tokenizer.decode(full[length - 1:-1]) and cut[1]
    kept = tokenizer.decode(ids[1], skip_special_tokens=True)
    assert " ".join([kept, cut[1]]).split() == long_prompt.split(), (kept, cut[1])
    assert len(full) - specials > length - specials
  assert len(warnings) == 3 and all("Prompt 1" in w for w in warnings), warnings
  ids, cut = tok.tokenize(clip, prompts, 77)
  assert cut == ["", ""] and ids.shape == (2, 77)


def test_bfloat16_compute_close_to_float32():
  ids = jnp.asarray(np.random.default_rng(2).integers(0, 1000, size=(2, 10)), jnp.int32)
  for name, key in (("tiny-clip", "text_embeds"), ("tiny-t5", "last_hidden_state")):
    shapes = nn.unbox(te.param_shapes(te.build(name)))
    rng = np.random.default_rng(0)  # random values, not init (whose eager ops compile slowly)
    params = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32),
                          shapes)
    ref = jax.jit(te.build(name).apply)({"params": params}, ids)[key]
    out = jax.jit(te.build(name, dtype="bfloat16").apply)({"params": params}, ids)[key]
    assert out.dtype == jnp.float32
    assert 0 < rel_err(out, ref) < 3e-2, (name, rel_err(out, ref))
