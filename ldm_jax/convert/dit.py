"""DiT checkpoints <-> ldm_jax `DiT` parameters.

Formats:
  * official facebookresearch/DiT `.pt` state dicts (`from_official`,
    `to_official_state_dict`). Timestep features use `/half`: time_freq_shift=0.
  * diffusers `DiTTransformer2DModel` folders, config.json + safetensors, possibly
    sharded (`from_diffusers`, `to_diffusers`). diffusers' timestep features use
    `/(half - 1)`: time_freq_shift=1. diffusers keeps a copy of the timestep and
    class embedders in every block (all used: block i's copy conditions block i,
    block 0's the final layer); they must agree, ldm_jax keeps one.

The key tables below are explicit (one name per tensor, `{i}` = block index);
`ldm_jax.convert.common` enforces them strictly in both directions. Torch Linear
weights are (out, in) and Conv2d weights OIHW; ours are (in, out) and HWIO.

Models built with `scan_layers=True` keep their blocks stacked under "blocks"
(see `ldm_jax.models.dit.stack_blocks`): the importers stack when asked
(`scan_layers=True`), the exporters unstack when the config says so. `qk_norm`
models cannot be converted: neither format has q/k norm weights.

Usage:
  params, config = from_diffusers("DiT-XL-2-256/transformer")
  model = DiT(**config); model.apply({"params": params}, x_nhwc, t, y)
"""

import dataclasses
import math
import os
import re
from typing import Mapping

import numpy as np

from ldm_jax.convert import common
from ldm_jax.convert.common import Rule
from ldm_jax.errors import check
from ldm_jax.models.dit import VARIANTS, DiT, stack_blocks, unstack_blocks
from ldm_jax.models.layers import compute_dtype
from ldm_jax.models.embeddings import sincos_2d

FREQ_DIM = 256  # timestep feature width in both implementations
OFFICIAL_NAMES = dict(
    patch="x_embedder.proj", t_mlp_0="t_embedder.mlp.0", t_mlp_2="t_embedder.mlp.2",
    table="y_embedder.embedding_table.weight", ada="blocks.{i}.adaLN_modulation.1",
    qkv="blocks.{i}.attn.qkv", proj="blocks.{i}.attn.proj", fc1="blocks.{i}.mlp.fc1",
    fc2="blocks.{i}.mlp.fc2", final_ada="final_layer.adaLN_modulation.1",
    final="final_layer.linear")
_EMB = "transformer_blocks.{i}.norm1.emb"
DIFFUSERS_NAMES = dict(
    patch="pos_embed.proj", t_mlp_0=_EMB + ".timestep_embedder.linear_1",
    t_mlp_2=_EMB + ".timestep_embedder.linear_2",
    table=_EMB + ".class_embedder.embedding_table.weight",
    ada="transformer_blocks.{i}.norm1.linear",
    qkv=tuple(f"transformer_blocks.{{i}}.attn1.to_{c}" for c in "qkv"),
    proj="transformer_blocks.{i}.attn1.to_out.0", fc1="transformer_blocks.{i}.ff.net.0.proj",
    fc2="transformer_blocks.{i}.ff.net.2", final_ada="proj_out_1", final="proj_out_2")
_DIFFUSERS_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")


def _model(config: Mapping) -> DiT:
  fields = {f.name for f in dataclasses.fields(DiT)} - {"parent", "name"}
  unknown = sorted(set(config) - fields)
  check(not unknown, f"DiT config has unknown fields {unknown}; valid: {sorted(fields)}")
  config = dict(config)
  if "dtype" in config:
    config["dtype"] = compute_dtype(config["dtype"])
  return DiT(**config)


def _per_block(params, model: DiT):
  """`params` with per-block `blocks_{i}` entries (unstacked if the model scans)."""
  if not model.scan_layers:
    return params
  return unstack_blocks(common.unflatten(common.flatten_params(params)))


def _scanned(params: dict, config: dict, scan_layers: bool) -> tuple[dict, dict]:
  """Imported per-block (params, config), stacked for a scanning model if asked."""
  if not scan_layers:
    return params, config
  return stack_blocks(params, config["depth"]), dict(config, scan_layers=True)


def _qkv(target: str, sources, d: int, heads: int) -> list[Rule]:
  """Attention input projection: fused torch (3D, D) or separate q/k/v (D, D)
  <-> our DenseGeneral kernel (D, 3, H, Dh) and bias (3, H, Dh)."""
  dh = d // heads
  if isinstance(sources, str):  # timm: one Linear(D, 3D), rows ordered (3, H, Dh)
    return [Rule(f"{target}/kernel", (f"{sources}.weight",), ((3 * d, d),),
                 fwd=lambda w: w.T.reshape(d, 3, heads, dh),
                 inv=lambda k: (k.reshape(d, 3 * d).T,)),
            Rule(f"{target}/bias", (f"{sources}.bias",), ((3 * d,),),
                 fwd=lambda b: b.reshape(3, heads, dh), inv=lambda b: (b.reshape(3 * d),))]
  return [Rule(f"{target}/kernel", tuple(f"{s}.weight" for s in sources), ((d, d),) * 3,
               fwd=lambda *w: np.stack([x.T for x in w], 1).reshape(d, 3, heads, dh),
               inv=lambda k: tuple(k[:, j].reshape(d, d).T for j in range(3))),
          Rule(f"{target}/bias", tuple(f"{s}.bias" for s in sources), ((d,),) * 3,
               fwd=lambda *b: np.stack(b).reshape(3, heads, dh),
               inv=lambda b: tuple(b[j].reshape(d) for j in range(3)))]


def _proj(target: str, source: str, d: int, heads: int) -> list[Rule]:
  """Attention output Linear(D, D) <-> DenseGeneral kernel (H, Dh, D) and bias (D,)."""
  return [Rule(f"{target}/kernel", (f"{source}.weight",), ((d, d),),
               fwd=lambda w: w.T.reshape(heads, d // heads, d), inv=lambda k: (k.reshape(d, d).T,)),
          common.same(f"{target}/bias", f"{source}.bias", (d,))]


def key_table(model: DiT, names: Mapping) -> list[Rule]:
  """The explicit rules for `model` in the format named by `names`
  (OFFICIAL_NAMES or DIFFUSERS_NAMES). Embedder names containing `{i}` are
  per-block copies and become tied rules. Block params are named `blocks_{i}`
  (unstack a scanning model's params first).

  Raises:
    UserError for a `qk_norm` model (neither format has q/k norm weights).
  """
  check(not model.qk_norm, "DiT with qk_norm=True cannot be converted to or from official "
        "DiT / diffusers DiTTransformer2DModel checkpoints: those formats have no q_norm / "
        "k_norm weights. Use qk_norm=False, or ldm_jax's own checkpoints.")
  d, heads, p, depth = model.hidden_size, model.num_heads, model.patch_size, model.depth
  mlp = int(d * model.mlp_ratio)
  rows = model.num_classes + int(model.class_dropout_prob > 0)

  def shared(rules: list[Rule]) -> list[Rule]:  # embedders: tied if copied per block
    return [common.tie(r, [r.sources[0].format(i=i) for i in range(depth)])
            if "{i}" in r.sources[0] else r for r in rules]

  rules = common.conv2d("x_embedder", names["patch"], model.in_channels, d, p)
  rules += shared(common.linear("t_embedder/mlp_0", names["t_mlp_0"], FREQ_DIM, d))
  rules += shared(common.linear("t_embedder/mlp_2", names["t_mlp_2"], d, d))
  rules += shared([common.same("y_embedder/embedding_table", names["table"], (rows, d))])
  for i in range(depth):
    name = {k: (tuple(s.format(i=i) for s in v) if isinstance(v, tuple) else v.format(i=i))
            for k, v in names.items()}
    b = f"blocks_{i}"
    rules += common.linear(f"{b}/adaLN_modulation", name["ada"], d, 6 * d)
    rules += _qkv(f"{b}/attn/qkv", name["qkv"], d, heads)
    rules += _proj(f"{b}/attn/proj", name["proj"], d, heads)
    rules += common.linear(f"{b}/mlp/fc1", name["fc1"], d, mlp)
    rules += common.linear(f"{b}/mlp/fc2", name["fc2"], mlp, d)
  rules += common.linear("final_layer/adaLN_modulation", names["final_ada"], d, 2 * d)
  rules += common.linear("final_layer/linear", names["final"], d, p * p * model.out_channels)
  return rules


def expected_params(config: Mapping):
  """Parameter shapes of `DiT(**config)`: the boxed tree of ShapeDtypeStructs that
  `jax.eval_shape` of its init gives (nothing is allocated)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  model = _model(config)
  s = model.input_size
  x = jax.ShapeDtypeStruct((1, s, s, model.in_channels), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x, jax.ShapeDtypeStruct((1,), jnp.float32),
                        jax.ShapeDtypeStruct((1,), jnp.int32))["params"]


def _shape(sd: Mapping, key: str, ndim: int, why: str) -> tuple[int, ...]:
  check(key in sd, f"official DiT checkpoint: missing {key} (needed to infer {why})")
  shape = tuple(np.shape(sd[key]))
  check(len(shape) == ndim, f"official DiT checkpoint: {key} has shape {shape}, expected "
        f"{ndim} dimensions")
  return shape


def infer_official_config(sd: Mapping, *, num_heads: int | None = None,
                          variant: str | None = None) -> dict:
  """DiT hyperparameters of an official state dict, read from tensor shapes.

  The number of heads is not visible in shapes: it comes from `num_heads`, else
  from `variant` ("DiT-XL/2"), else from the one paper variant with the same
  depth, width and patch size. The label table is assumed to hold the extra null
  class (all released checkpoints were trained with label dropout).
  """
  d, c, p, p2 = _shape(sd, "x_embedder.proj.weight", 4, "width, channels, patch size")
  check(p == p2, f"official DiT checkpoint: non-square patch {p}x{p2}")
  rows, _ = _shape(sd, "y_embedder.embedding_table.weight", 2, "the number of classes")
  _, tokens, _ = _shape(sd, "pos_embed", 3, "the input size")
  grid = math.isqrt(tokens)
  check(grid * grid == tokens, f"official DiT checkpoint: pos_embed has {tokens} tokens, "
        "not a square grid")
  out = _shape(sd, "final_layer.linear.weight", 2, "output channels")[0] // (p * p)
  check(out in (c, 2 * c), f"official DiT checkpoint: {out} output channels for {c} input "
        "channels; ldm_jax's DiT supports only C (fixed variance) or 2C (learned sigma)")
  mlp = _shape(sd, "blocks.0.mlp.fc1.weight", 2, "the MLP width")[0]
  blocks = [int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m]
  check(blocks, "official DiT checkpoint: no blocks.N.* tensors")
  depth = 1 + max(blocks)
  if num_heads is None and variant is not None:
    check(variant in VARIANTS, f"unknown DiT variant {variant!r}; valid: {sorted(VARIANTS)}")
    v = VARIANTS[variant]
    check((v["depth"], v["hidden_size"], v["patch_size"]) == (depth, d, p),
          f"{variant} has depth {v['depth']}, width {v['hidden_size']}, patch {v['patch_size']};"
          f" the checkpoint has depth {depth}, width {d}, patch {p}")
    num_heads = v["num_heads"]
  if num_heads is None:
    match = sorted(n for n, v in VARIANTS.items()
                   if (v["depth"], v["hidden_size"], v["patch_size"]) == (depth, d, p))
    check(len(match) == 1, f"official DiT checkpoint (depth {depth}, width {d}, patch {p}) "
          "matches no single known variant; pass num_heads= or variant=")
    num_heads = VARIANTS[match[0]]["num_heads"]
  check(d % num_heads == 0, f"width {d} is not divisible by num_heads {num_heads}")
  return dict(input_size=grid * p, patch_size=p, in_channels=c, hidden_size=d, depth=depth,
              num_heads=num_heads, mlp_ratio=mlp / d, num_classes=rows - 1,
              class_dropout_prob=0.1, learn_sigma=out == 2 * c, time_freq_shift=0.0,
              mlp_norm_eps=1e-6)


def from_official(checkpoint, *, num_heads: int | None = None, variant: str | None = None,
                  scan_layers: bool = False) -> tuple[dict, dict]:
  """Official facebookresearch/DiT weights -> (ldm_jax params, DiT config dict).

  Args:
    checkpoint: path of a `.pt` file (a bare state dict, or a training checkpoint
      whose "ema" weights are used, else "model"), or a {name: array} mapping.
    num_heads / variant: see `infer_official_config`.
    scan_layers: return params for a `scan_layers=True` model (blocks stacked).
  Returns:
    (params, config): a nested dict of float32 numpy arrays for
    `DiT(**config).apply({"params": params}, ...)`, and the DiT fields.
  Raises:
    UserError naming every missing, unused or mis-shaped tensor, or a pos_embed
    that is not the standard 2-D sin-cos table.
  """
  sd = (common.load_torch_state_dict(os.fspath(checkpoint), prefer=("ema", "model"))
        if isinstance(checkpoint, (str, os.PathLike)) else dict(checkpoint))
  config = infer_official_config(sd, num_heads=num_heads, variant=variant)
  model = _model(config)
  params = common.convert_tensors(sd, key_table(model, OFFICIAL_NAMES),
                                  what="official DiT checkpoint", ignore=("pos_embed",))
  grid = config["input_size"] // config["patch_size"]
  err = float(np.max(np.abs(np.asarray(sd["pos_embed"], np.float64)[0]
                            - sincos_2d(config["hidden_size"], grid, grid))))
  check(err <= 1e-5, f"official DiT checkpoint: pos_embed differs from the fixed 2-D sin-cos "
        f"table by up to {err:.3g}; ldm_jax's DiT cannot use a learned position embedding")
  common.check_tree_matches(params, expected_params(config), what="official DiT checkpoint")
  return _scanned(params, config, scan_layers)


def to_official_state_dict(params, config: Mapping, *, allow_timestep_mismatch: bool = False
                           ) -> dict[str, np.ndarray]:
  """ldm_jax params -> official DiT state dict (numpy; includes `pos_embed`).

  The official model uses time_freq_shift=0; exporting another value raises
  unless `allow_timestep_mismatch` (the outputs would then differ slightly).
  """
  model = _model(config)
  check(model.time_freq_shift == 0 or allow_timestep_mismatch,
        f"official DiT uses time_freq_shift=0, these params were made with "
        f"{model.time_freq_shift}; pass allow_timestep_mismatch=True to export anyway")
  common.check_tree_matches(params, expected_params(config), what="DiT params")
  sd = common.export_tensors(_per_block(params, model), key_table(model, OFFICIAL_NAMES),
                             what="DiT params")
  grid = model.input_size // model.patch_size
  sd["pos_embed"] = sincos_2d(model.hidden_size, grid, grid)[None]
  return sd


def diffusers_to_config(cfg: Mapping) -> dict:
  """A diffusers DiT config.json dict -> ldm_jax DiT fields (defaults as diffusers')."""
  what = "diffusers DiT config.json"
  check(cfg.get("_class_name", _DIFFUSERS_CLASSES[0]) in _DIFFUSERS_CLASSES,
        f"{what}: _class_name {cfg.get('_class_name')!r} is not one of {_DIFFUSERS_CLASSES}")
  for key, want in (("norm_type", "ada_norm_zero"), ("activation_fn", "gelu-approximate"),
                    ("attention_bias", True), ("norm_elementwise_affine", False)):
    check(cfg.get(key, want) == want,
          f"{what}: {key}={cfg.get(key)!r} is not supported (ldm_jax's DiT needs {want!r})")
  check(cfg.get("num_embeds_ada_norm", 1000) is not None,
        f"{what}: num_embeds_ada_norm (number of classes) is null")
  in_ch = cfg.get("in_channels", 4)
  out_ch = cfg.get("out_channels") or in_ch
  check(out_ch in (in_ch, 2 * in_ch), f"{what}: out_channels {out_ch} must be in_channels "
        f"{in_ch} or twice it")
  heads = cfg.get("num_attention_heads", 16)
  return dict(input_size=cfg.get("sample_size", 32), patch_size=cfg.get("patch_size", 2),
              in_channels=in_ch, hidden_size=heads * cfg.get("attention_head_dim", 72),
              depth=cfg.get("num_layers", 28), num_heads=heads, mlp_ratio=4.0,
              num_classes=cfg.get("num_embeds_ada_norm", 1000), class_dropout_prob=0.1,
              learn_sigma=out_ch == 2 * in_ch, time_freq_shift=1.0,
              mlp_norm_eps=cfg.get("norm_eps", 1e-5))  # diffusers' pre-MLP LayerNorm eps


def from_diffusers(folder: str, *, variant: str | None = None,
                   scan_layers: bool = False) -> tuple[dict, dict]:
  """A diffusers `DiTTransformer2DModel` folder -> (ldm_jax params, DiT config dict).

  Args:
    folder: holds config.json and diffusion_pytorch_model[.variant].safetensors
      (or its shards plus the index json); e.g. a pipeline's `transformer/`.
    variant: weight variant such as "fp16".
    scan_layers: return params for a `scan_layers=True` model (blocks stacked).
  Returns:
    (params, config) as in `from_official`; config has time_freq_shift=1.
  Raises:
    UserError naming every missing, unused or mis-shaped tensor, per-block
    embedder copies that differ, or an unsupported config.
  """
  folder = os.fspath(folder)
  config = diffusers_to_config(common.read_json(os.path.join(folder, "config.json")))
  tensors = common.load_safetensors(folder, variant=variant)
  params = common.convert_tensors(tensors, key_table(_model(config), DIFFUSERS_NAMES),
                                  what=f"diffusers DiT {folder}")
  common.check_tree_matches(params, expected_params(config), what=f"diffusers DiT {folder}")
  return _scanned(params, config, scan_layers)


def to_diffusers(params, config: Mapping, folder: str, *,
                 allow_timestep_mismatch: bool = False) -> None:
  """Writes ldm_jax DiT params as a diffusers folder (config.json + safetensors)
  that `DiTTransformer2DModel.from_pretrained(folder)` loads, every block getting
  its copy of the embedders.

  diffusers computes timestep features with time_freq_shift=1 and a fixed MLP
  ratio 4 and label-dropout table; other configs raise (the timestep one unless
  `allow_timestep_mismatch`, for which outputs would differ slightly). A
  `scan_layers` config's stacked params are unstacked; a `qk_norm` one raises.
  """
  model = _model(config)
  check(model.time_freq_shift == 1 or allow_timestep_mismatch,
        f"diffusers' DiT uses time_freq_shift=1, these params were made with "
        f"{model.time_freq_shift}; pass allow_timestep_mismatch=True to export anyway")
  check(model.mlp_ratio == 4, f"diffusers' DiT has MLP ratio 4, not {model.mlp_ratio}")
  check(model.class_dropout_prob > 0, "diffusers' DiT always has the null-class row; "
        "class_dropout_prob=0 params lack it")
  common.check_tree_matches(params, expected_params(config), what="DiT params")
  tensors = common.export_tensors(_per_block(params, model), key_table(model, DIFFUSERS_NAMES),
                                  what="DiT params")
  cfg = dict(_class_name="DiTTransformer2DModel", num_attention_heads=model.num_heads,
             attention_head_dim=model.hidden_size // model.num_heads,
             in_channels=model.in_channels, out_channels=model.out_channels,
             num_layers=model.depth, dropout=0.0, norm_num_groups=32, attention_bias=True,
             sample_size=model.input_size, patch_size=model.patch_size,
             activation_fn="gelu-approximate", num_embeds_ada_norm=model.num_classes,
             upcast_attention=False, norm_type="ada_norm_zero", norm_elementwise_affine=False,
             norm_eps=model.mlp_norm_eps)
  os.makedirs(folder, exist_ok=True)
  common.write_json(cfg, os.path.join(folder, "config.json"))
  common.save_safetensors(tensors, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
