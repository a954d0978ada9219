"""MM-DiT (SD3 / SD3.5): parity with diffusers' `SD3Transformer2DModel` on tiny random
models through the converter, parameter counts of the released models, bfloat16,
errors and logical axes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from ldm_jax.convert import common, mmdit as cmm  # noqa: E402
from ldm_jax.errors import UserError  # noqa: E402
from ldm_jax.models import mmdit  # noqa: E402
from ldm_jax.models.mmdit import MMDiT, VARIANTS  # noqa: E402
from ldm_jax.models.registry import count_params  # noqa: E402

TOL = 1e-5  # max |ours - diffusers| / max |diffusers|, float32
BF16_TOL = 5e-2  # the same measure, bfloat16 compute vs float32
# sum(p.numel() for p in SD3Transformer2DModel(**config).parameters()) of the released
# configs (measured with diffusers 0.42.1; the position grid buffer is not a parameter).
GOLDEN_PARAMS = {"sd3-medium": 2_028_328_000, "sd3.5-medium": 2_243_171_520,
                 "sd3.5-large": 8_056_627_520}
TINY = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
            caption_projection_dim=32, pooled_projection_dim=24, pos_embed_max_size=16)
# name -> (diffusers config overrides, latent H x W, how the folder is saved)
CASES = {
    "plain": (dict(), (8, 8), {}),
    "rms_dual_crop": (dict(qk_norm="rms_norm", dual_attention_layers=(0, 1)), (6, 10),
                      dict(max_shard_size="20KB")),  # sharded + index json
    "no_max_size": (dict(pos_embed_max_size=None), (6, 10), dict(variant="fp16")),
    "layer_norm": (dict(qk_norm="layer_norm", dual_attention_layers=(1,)), (8, 4), {}),
    "fp32_layer_norm": (dict(qk_norm="fp32_layer_norm"), (4, 8), {}),
}


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def _inputs(hw, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((batch, *hw, 4)).astype(np.float32),
          rng.uniform(0, 1000, batch).astype(np.float32),
          rng.standard_normal((batch, 5, 32)).astype(np.float32),
          rng.standard_normal((batch, 24)).astype(np.float32))


def _run_diffusers(model, x, t, c, pooled, skip_layers=None):
  with torch.no_grad():
    out = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(c),
                torch.from_numpy(pooled), torch.from_numpy(t), return_dict=False,
                skip_layers=skip_layers)[0]
  return out.numpy().transpose(0, 2, 3, 1)


def _run_ours(params, kwargs, x, t, c, pooled, **kw):
  return np.asarray(MMDiT(**kwargs).apply({"params": params}, jnp.asarray(x), jnp.asarray(t),
                                          jnp.asarray(c), jnp.asarray(pooled), **kw))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """name -> (random diffusers model, its saved folder, our params, our kwargs);
  built on first use. Every weight is random, the zero-initialised ones too."""
  cache = {}

  def get(name):
    if name not in cache:
      overrides, _, save = CASES[name]
      torch.manual_seed(0)
      model = diffusers.SD3Transformer2DModel(**{**TINY, **overrides})
      with torch.no_grad():  # fan-in scaling keeps float32 well conditioned
        for q in model.parameters():
          torch.nn.init.normal_(q, std=q.shape[1:].numel() ** -0.5 if q.ndim > 1 else 0.2)
      folder = tmp_path_factory.mktemp(name)
      model.save_pretrained(folder, **save)
      params, kwargs = cmm.from_diffusers(str(folder))
      cache[name] = (model.eval(), folder, params, kwargs)
    return cache[name]
  return get


@pytest.mark.parametrize("name", list(CASES))
def test_matches_diffusers_and_round_trips(tiny, tmp_path, name):
  model, _, params, kwargs = tiny(name)
  overrides, hw, _ = CASES[name]
  assert kwargs == cmm.config_from_diffusers(dict(model.config))
  inputs = _inputs(hw)
  ref = _run_diffusers(model, *inputs)
  err = _rel(_run_ours(params, kwargs, *inputs), ref)
  print(f"{name}: rel err {err:.2e}")
  assert err <= TOL
  cmm.to_diffusers(params, kwargs, str(tmp_path))
  back, kwargs_back = cmm.from_diffusers(str(tmp_path))
  assert kwargs_back == kwargs
  jax.tree.map(np.testing.assert_array_equal, back, params)
  loaded = diffusers.SD3Transformer2DModel.from_pretrained(str(tmp_path)).eval()
  assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == \
      {k: (list(v) if k == "dual_attention_layers" else v)
       for k, v in {**TINY, "dual_attention_layers": [], "qk_norm": None, **overrides}.items()}
  np.testing.assert_array_equal(_run_diffusers(loaded, *inputs), ref)


def test_skip_layers_match_diffusers(tiny):
  model, _, params, kwargs = tiny("rms_dual_crop")
  inputs = _inputs((6, 10), seed=1)
  full = _run_ours(params, kwargs, *inputs)
  for skip in ((0,), (1,)):
    ref = _run_diffusers(model, *inputs, skip_layers=list(skip))
    ours = _run_ours(params, kwargs, *inputs, skip_layers=skip)
    err = _rel(ours, ref)
    print(f"skip_layers={skip}: rel err {err:.2e}")
    assert err <= TOL and _rel(full, ref) > 1e-2  # skipping changes the output


def test_bfloat16_close_to_float32(tiny):
  _, _, params, kwargs = tiny("rms_dual_crop")
  inputs = _inputs((6, 10), seed=2)
  f32 = _run_ours(params, kwargs, *inputs)
  bf16_model = MMDiT(**dict(kwargs, dtype=jnp.bfloat16))
  bf16 = np.asarray(bf16_model.apply({"params": params}, *map(jnp.asarray, inputs)))
  err = _rel(bf16, f32)
  print(f"bfloat16 vs float32: rel err {err:.2e}")
  assert bf16.dtype == np.float32 and 0 < err <= BF16_TOL
  shapes = jax.eval_shape(bf16_model.init, jax.random.key(0), *map(jnp.asarray, inputs))
  assert {x.dtype for x in jax.tree.leaves(nn.unbox(shapes))} == {jnp.dtype(jnp.float32)}


def test_stored_position_grid_is_checked(tiny):
  _, folder, params, kwargs = tiny("plain")
  tensors = common.load_safetensors(str(folder))
  config = common.read_json(str(folder / "config.json"))
  again, _ = cmm.from_diffusers((tensors, config))
  jax.tree.map(np.testing.assert_array_equal, again, params)
  bad = dict(tensors, **{cmm.POS_EMBED: tensors[cmm.POS_EMBED] * 1.01})
  with pytest.raises(UserError, match="position grid"):
    cmm.from_diffusers((bad, config))
  with pytest.raises(UserError, match="missing: transformer_blocks.1.attn.to_q.weight"):
    cmm.from_diffusers(({k: v for k, v in tensors.items()
                         if k != "transformer_blocks.1.attn.to_q.weight"}, config))
  with pytest.raises(UserError, match="unknown / unsupported keys"):
    cmm.from_diffusers((tensors, dict(config, use_pos_embed=True)))


def _eval_params(model, hw=(8, 8), context_width=None, pooled_width=None, **call_kw):
  s = jax.ShapeDtypeStruct
  init = lambda *args: model.init(*args, **call_kw)
  return jax.eval_shape(init, jax.random.key(0),
                        s((1, *hw, model.in_channels), jnp.float32), s((1,), jnp.float32),
                        s((1, 3, context_width or model.context_dim), jnp.float32),
                        s((1, pooled_width or model.pooled_dim), jnp.float32))["params"]


@pytest.mark.parametrize("name", sorted(GOLDEN_PARAMS))
def test_param_count_matches_diffusers(name):
  kwargs = VARIANTS[name]
  assert cmm.config_from_diffusers(cmm.diffusers_config(kwargs)) == dict(
      kwargs, caption_projection_dim=None, qk_norm=kwargs.get("qk_norm", False),
      dual_attention_layers=kwargs.get("dual_attention_layers", ()))
  ours = count_params(_eval_params(MMDiT(**kwargs), hw=(16, 16)))
  with torch.device("meta"):
    ref = diffusers.SD3Transformer2DModel(**{k: v for k, v in cmm.diffusers_config(kwargs).items()
                                             if k != "_class_name"})
  print(f"{name}: {ours:,} parameters")
  assert ours == sum(q.numel() for q in ref.parameters()) == GOLDEN_PARAMS[name]


def test_every_param_has_logical_axes():
  for kwargs in (VARIANTS["tiny-x"], dict(VARIANTS["tiny"], qk_norm="layer_norm")):
    boxed = _eval_params(MMDiT(**kwargs))
    leaves = jax.tree_util.tree_leaves_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for _, x in leaves)
    assert all(len(x.names) == x.value.ndim for _, x in leaves)
    # Only the patch-pixel output axis is unnamed (as in DiT): never sharded.
    unnamed = {jax.tree_util.keystr(p) for p, x in leaves if all(n is None for n in x.names)}
    assert unnamed == {"['final_layer']['linear']['bias']"}, unnamed
    leaves = [x for _, x in leaves]
    specs = jax.tree.leaves(nn.get_partition_spec(boxed))
    assert len(specs) == len(leaves)
  paths = common.flatten_params(jax.tree.map(lambda x: np.zeros(x.shape, x.dtype),
                                             nn.unbox(_eval_params(MMDiT(**VARIANTS["tiny-x"])))))
  assert "blocks_0/attn2/q_norm/scale" in paths
  assert "blocks_1/attn/context_proj/kernel" not in paths  # the last block is pre-only


def test_build_and_user_errors():
  model = mmdit.build(ml_collections.ConfigDict(dict(name="mmdit", variant="tiny-x")))
  assert model.qk_norm == "rms_norm" and model.dual_attention_layers == (0,)
  with pytest.raises(UserError, match="unknown mmdit variant 'nope'"):
    mmdit.build(ml_collections.ConfigDict(dict(name="mmdit", variant="nope")))
  with pytest.raises(UserError, match="unknown qk_norm 'l2'"):
    mmdit.build(ml_collections.ConfigDict(dict(name="mmdit", variant="tiny", qk_norm="l2")))
  with pytest.raises(UserError, match="unknown qk_norm"):
    _eval_params(MMDiT(**dict(VARIANTS["tiny"], qk_norm="l2")))
  tiny = MMDiT(**VARIANTS["tiny"])
  with pytest.raises(UserError, match="not divisible by patch size 2"):
    _eval_params(tiny, hw=(8, 7))
  with pytest.raises(UserError, match="exceeds the position grid: at most 32x32"):
    _eval_params(tiny, hw=(34, 8))
  with pytest.raises(UserError, match="context must be .* context_dim=32"):
    _eval_params(tiny, context_width=31)
  with pytest.raises(UserError, match="pooled must be .* pooled_dim=32"):
    _eval_params(tiny, pooled_width=16)
  with pytest.raises(UserError, match="caption_projection_dim 48 must equal"):
    _eval_params(MMDiT(**dict(VARIANTS["tiny"], caption_projection_dim=48)))
  with pytest.raises(UserError, match="caption_projection_dim 48 differs"):
    cmm.config_from_diffusers(dict(TINY, caption_projection_dim=48))
  with pytest.raises(UserError, match="skip_layers \\[5\\]"):
    _eval_params(tiny, skip_layers=(5,))
