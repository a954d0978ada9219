"""transformers text-encoder folders <-> ldm_jax `CLIPTextEncoder` / `T5Encoder`.

A folder holds config.json and model.safetensors (or shards
model-0000i-of-0000n.safetensors listed by model.safetensors.index.json), as
`save_pretrained` writes them and as SD3 / SDXL pipelines ship their text_encoder*
subfolders. Supported classes (config "architectures", else "model_type"):

  CLIPTextModelWithProjection  text_model.* + text_projection.weight
  CLIPTextModel                text_model.* (files from transformers < 5 and the
                               pipelines) or the same names without the prefix
                               (transformers 5 writes those); no projection
  T5EncoderModel               shared.weight and/or its tied copy
                               encoder.embed_tokens.weight (must be equal), encoder.*

The key tables below name every tensor; `ldm_jax.convert.common` enforces them
both ways. The only tensor read and dropped is the CLIP buffer
`embeddings.position_ids` (0..max_positions-1, checked), which old files carry.
torch Linear (out, in) <-> our (in, ...) kernels; q/k/v are fused into one kernel
(D, 3, H, Dh) (+ bias (3, H, Dh) for CLIP), attention outputs are (H, Dh, D).

Usage:
  module, params = load_text_encoder("stable-diffusion-3-medium-diffusers/text_encoder")
  out = module.apply({"params": params}, ids)  # dict, see ldm_jax.models.text_encoders
  save_text_encoder(module, params, "out/text_encoder")
"""

import os
from typing import Mapping

import numpy as np

from ldm_jax.convert import common
from ldm_jax.convert.common import Rule
from ldm_jax.errors import check
from ldm_jax.models import text_encoders as te

CLIP_WITH_PROJECTION = "CLIPTextModelWithProjection"
CLIP_PLAIN = "CLIPTextModel"
T5_ENCODER = "T5EncoderModel"
ARCHITECTURES = (CLIP_WITH_PROJECTION, CLIP_PLAIN, T5_ENCODER)
_MODEL_TYPES = {"clip_text_model": "clip", "t5": "t5"}
# transformers' config defaults (CLIPTextConfig, T5Config) for keys a file may omit.
_CLIP_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                      num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                      hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=512,
                      eos_token_id=49407)
_T5_DEFAULTS = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                    relative_attention_num_buckets=32, relative_attention_max_distance=128,
                    feed_forward_proj="relu", layer_norm_epsilon=1e-6)
_CLIP_FIELDS = dict(vocab_size="vocab_size", hidden_size="hidden_size",
                    intermediate_size="intermediate_size", num_layers="num_hidden_layers",
                    num_heads="num_attention_heads", max_positions="max_position_embeddings",
                    hidden_act="hidden_act", layer_norm_eps="layer_norm_eps",
                    eos_token_id="eos_token_id")
_T5_FIELDS = {k: k for k in _T5_DEFAULTS}


def architecture_of(cfg: Mapping, what: str = "text encoder config.json") -> str:
  """The supported transformers class a config.json describes (one of ARCHITECTURES)."""
  archs = cfg.get("architectures") or []
  known = [a for a in archs if a in ARCHITECTURES]
  if known:
    return known[0]
  check(not archs and cfg.get("model_type") in _MODEL_TYPES,
        f"{what}: architectures {archs or None} / model_type {cfg.get('model_type')!r} is not "
        f"a supported text encoder; valid architectures: {list(ARCHITECTURES)} (model_type "
        f"{sorted(_MODEL_TYPES)})")
  return T5_ENCODER if cfg["model_type"] == "t5" else CLIP_WITH_PROJECTION


def config_from_transformers(cfg: Mapping, architecture: str | None = None) -> dict:
  """A transformers config.json dict -> `text_encoders.build` kwargs (with `kind`).

  Args:
    cfg: the config dict (CLIPTextConfig or T5Config fields; absent keys take
      transformers' defaults).
    architecture: one of ARCHITECTURES; default from the config. CLIPTextModel
      gives projection_dim None.
  """
  architecture = architecture or architecture_of(cfg)
  check(architecture in ARCHITECTURES, f"architecture {architecture!r}; valid: "
        f"{list(ARCHITECTURES)}")
  if architecture == T5_ENCODER:
    out = {ours: cfg.get(theirs, _T5_DEFAULTS[theirs]) for ours, theirs in _T5_FIELDS.items()}
    te.t5_feed_forward(out["feed_forward_proj"])
    return dict(kind="t5", **out)
  out = {ours: cfg.get(theirs, _CLIP_DEFAULTS[theirs]) for ours, theirs in _CLIP_FIELDS.items()}
  check(isinstance(out["eos_token_id"], int), f"CLIP config eos_token_id "
        f"{out['eos_token_id']!r} must be one integer (the pooled-token id)")
  te.activation(out["hidden_act"])
  out["projection_dim"] = (cfg.get("projection_dim", _CLIP_DEFAULTS["projection_dim"])
                           if architecture == CLIP_WITH_PROJECTION else None)
  return dict(kind="clip", **out)


def config_to_transformers(config: Mapping) -> dict:
  """`text_encoders.build` kwargs (with `kind`) -> a transformers config.json dict for
  CLIPTextModelWithProjection (CLIPTextModel when projection_dim is None) or
  T5EncoderModel."""
  config = dict(config)
  kind = config.pop("kind", None)
  check(kind in te.MODEL_CLASSES, f"text encoder kind {kind!r}; valid: {sorted(te.MODEL_CLASSES)}")
  if kind == "t5":
    out = {theirs: config[ours] for ours, theirs in _T5_FIELDS.items()}
    out.update(architectures=[T5_ENCODER], model_type="t5", is_encoder_decoder=False,
               use_cache=False, dropout_rate=0.0, dtype="float32")
    return out
  out = {theirs: config[ours] for ours, theirs in _CLIP_FIELDS.items()}
  arch = CLIP_WITH_PROJECTION if config.get("projection_dim") else CLIP_PLAIN
  if arch == CLIP_WITH_PROJECTION:
    out["projection_dim"] = config["projection_dim"]
  out.update(architectures=[arch], model_type="clip_text_model", attention_dropout=0.0,
             dtype="float32")
  return out


def _qkv(target: str, sources: tuple[str, str, str], d: int, heads: int, dh: int,
         bias: bool) -> list[Rule]:
  """torch q/k/v Linear (H*Dh, D) (+ bias) <-> kernel (D, 3, H, Dh) (+ bias (3, H, Dh))."""
  inner = heads * dh
  kernel = f"{target}/kernel" if bias else target
  rules = [Rule(kernel, tuple(f"{s}.weight" for s in sources), ((inner, d),) * 3,
                fwd=lambda *w: np.stack([x.T for x in w], 1).reshape(d, 3, heads, dh),
                inv=lambda k: tuple(k[:, j].reshape(d, inner).T for j in range(3)))]
  if bias:
    rules.append(Rule(f"{target}/bias", tuple(f"{s}.bias" for s in sources), ((inner,),) * 3,
                      fwd=lambda *b: np.stack(b).reshape(3, heads, dh),
                      inv=lambda b: tuple(b[j].reshape(inner) for j in range(3))))
  return rules


def _out(target: str, source: str, d: int, heads: int, dh: int, bias: bool) -> list[Rule]:
  """torch output Linear (D, H*Dh) (+ bias) <-> kernel (H, Dh, D) (+ bias (D,))."""
  kernel = f"{target}/kernel" if bias else target
  rules = [Rule(kernel, (f"{source}.weight",), ((d, heads * dh),),
                fwd=lambda w: w.T.reshape(heads, dh, d),
                inv=lambda k: (k.reshape(heads * dh, d).T,))]
  if bias:
    rules.append(common.same(f"{target}/bias", f"{source}.bias", (d,)))
  return rules


def _norm(target: str, source: str, d: int) -> list[Rule]:
  return [common.same(f"{target}/scale", f"{source}.weight", (d,)),
          common.same(f"{target}/bias", f"{source}.bias", (d,))]


def clip_key_table(module: te.CLIPTextEncoder, prefix: str = "text_model.") -> list[Rule]:
  """Rules for a CLIP text model whose tower tensors are named `{prefix}embeddings...`
  (plus `text_projection.weight` when the module has a projection)."""
  d, heads, ff = module.hidden_size, module.num_heads, module.intermediate_size
  dh = d // heads
  p = prefix
  rules = [common.same("token_embedding/embedding", f"{p}embeddings.token_embedding.weight",
                       (module.vocab_size, d)),
           common.same("position_embedding/embedding",
                       f"{p}embeddings.position_embedding.weight", (module.max_positions, d))]
  for i in range(module.num_layers):
    s, t = f"{p}encoder.layers.{i}.", f"layers_{i}/"
    rules += _norm(t + "layer_norm1", s + "layer_norm1", d)
    rules += _qkv(t + "qkv", tuple(f"{s}self_attn.{c}_proj" for c in "qkv"), d, heads, dh, True)
    rules += _out(t + "out_proj", s + "self_attn.out_proj", d, heads, dh, True)
    rules += _norm(t + "layer_norm2", s + "layer_norm2", d)
    rules += common.linear(t + "fc1", s + "mlp.fc1", d, ff)
    rules += common.linear(t + "fc2", s + "mlp.fc2", ff, d)
  rules += _norm("final_layer_norm", f"{p}final_layer_norm", d)
  if module.projection_dim:
    rules.append(common.linear_kernel("text_projection/kernel", "text_projection.weight", d,
                                      module.projection_dim))
  return rules


def t5_key_table(module: te.T5Encoder, embeddings: tuple[str, ...] = ("shared.weight",)
                 ) -> list[Rule]:
  """Rules for a T5EncoderModel; `embeddings` names the token-table copies the file
  holds ("shared.weight" and/or "encoder.embed_tokens.weight")."""
  d, heads, dh, ff = module.d_model, module.num_heads, module.d_kv, module.d_ff
  table = common.same("shared/embedding", embeddings[0], (module.vocab_size, d))
  rules = [common.tie(table, embeddings) if len(embeddings) > 1 else table,
           common.same("relative_attention_bias",
                       "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                       (module.relative_attention_num_buckets, heads))]
  gated, _ = te.t5_feed_forward(module.feed_forward_proj)
  for i in range(module.num_layers):
    s, t = f"encoder.block.{i}.layer.", f"layers_{i}/"
    rules.append(common.same(t + "attn_norm/scale", s + "0.layer_norm.weight", (d,)))
    rules += _qkv(t + "qkv", tuple(f"{s}0.SelfAttention.{c}" for c in "qkv"), d, heads, dh, False)
    rules += _out(t + "o", s + "0.SelfAttention.o", d, heads, dh, False)
    rules.append(common.same(t + "ffn_norm/scale", s + "1.layer_norm.weight", (d,)))
    for w in (("wi_0", "wi_1") if gated else ("wi",)):
      rules.append(common.linear_kernel(f"{t}{w}/kernel", f"{s}1.DenseReluDense.{w}.weight", d, ff))
    rules.append(common.linear_kernel(t + "wo/kernel", s + "1.DenseReluDense.wo.weight", ff, d))
  rules.append(common.same("final_norm/scale", "encoder.final_layer_norm.weight", (d,)))
  return rules


_T5_EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight")


def load_text_encoder(folder: str, dtype=np.float32, *, model_dtype="float32"):
  """A transformers text-encoder folder -> (module, params).

  Args:
    folder: holds config.json and model.safetensors (or its shards + index json).
    dtype: numpy dtype of the returned parameters (None keeps the file's).
    model_dtype: compute dtype of the module ("float32" | "bfloat16").
  Returns:
    (module, params): a `CLIPTextEncoder` or `T5Encoder` and its nested params dict
    for `module.apply({"params": params}, input_ids)`.
  Raises:
    UserError for a folder that is not a CLIPTextModelWithProjection /
    CLIPTextModel / T5EncoderModel one, naming every missing, unused or mis-shaped
    tensor.
  """
  folder = os.fspath(folder)
  config_path = os.path.join(folder, "config.json")
  check(os.path.isdir(folder), f"{folder}: no such folder (expected a transformers text "
        f"encoder folder: config.json + model.safetensors, classes {list(ARCHITECTURES)})")
  check(os.path.isfile(config_path), f"{folder} has no config.json: not a transformers text "
        f"encoder folder (expected config.json + model.safetensors, classes "
        f"{list(ARCHITECTURES)})")
  cfg = common.read_json(config_path)
  what = f"transformers text encoder {folder}"
  arch = architecture_of(cfg, what=config_path)
  tensors = common.load_safetensors(folder, stem="model")
  if arch == CLIP_WITH_PROJECTION and not cfg.get("architectures") \
     and "text_projection.weight" not in tensors:
    arch = CLIP_PLAIN
  module = te.build(config_from_transformers(cfg, arch), dtype=model_dtype)
  ignore: tuple[str, ...] = ()
  if arch == T5_ENCODER:
    present = tuple(n for n in _T5_EMBEDDINGS if n in tensors) or _T5_EMBEDDINGS[:1]
    rules = t5_key_table(module, present)
  else:
    prefix = "text_model." if (arch == CLIP_WITH_PROJECTION or any(
        k.startswith("text_model.") for k in tensors)) else ""
    rules = clip_key_table(module, prefix)
    buffer = f"{prefix}embeddings.position_ids"
    if buffer in tensors:
      ids = np.asarray(tensors[buffer]).reshape(-1)
      check(np.array_equal(ids, np.arange(module.max_positions)),
            f"{what}: {buffer} is not 0..{module.max_positions - 1}; ldm_jax's CLIP uses "
            "positions 0..L-1")
      ignore = (buffer,)
  params = common.convert_tensors(tensors, rules, what=what, ignore=ignore, dtype=dtype)
  common.check_tree_matches(params, te.param_shapes(module), what=what)
  return module, params


def save_text_encoder(module, params, folder: str) -> None:
  """Writes `params` of a text encoder `module` as a transformers folder
  (config.json + model.safetensors, float32) that `CLIPTextModelWithProjection` /
  `CLIPTextModel` (projection_dim None) / `T5EncoderModel.from_pretrained` loads.
  CLIP towers are written under `text_model.` (the layout older transformers and
  the pipelines use; transformers 5 reads it too); T5 writes `shared.weight`."""
  config = te.config_of(module)
  what = "text encoder params"
  common.check_tree_matches(params, te.param_shapes(module), what=what)
  if config["kind"] == "t5":
    rules = t5_key_table(module)
  else:
    rules = clip_key_table(module, "text_model.")
  tensors = common.export_tensors(params, rules, what=what)
  os.makedirs(folder, exist_ok=True)
  common.write_json(config_to_transformers(config), os.path.join(folder, "config.json"))
  common.save_safetensors(tensors, os.path.join(folder, "model.safetensors"))

