"""DiT: parameter counts of the paper variants, and the checkpoint converters
(official `.pt`, diffusers `DiTTransformer2DModel`) checked numerically against
diffusers and a small torch re-implementation of the official forward pass."""

import math
import re
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
F = torch.nn.functional

from ldm_jax.convert import common, dit as cdit  # noqa: E402
from ldm_jax.errors import UserError  # noqa: E402
from ldm_jax.models.dit import DiT, VARIANTS, stack_blocks  # noqa: E402
from ldm_jax.models.registry import count_params  # noqa: E402

PAPER_VARIANTS = [f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)]
# facebookresearch/DiT models.py at input 32x32x4, learn_sigma, 1000 classes + null row:
# sum(p.numel() for p in model.parameters()), which includes the frozen pos_embed (T x D).
OFFICIAL_PARAMS = {
    "DiT-S/2": 32_963_360, "DiT-S/4": 32_945_024, "DiT-S/8": 33_148_160,
    "DiT-B/2": 130_512_416, "DiT-B/4": 130_475_648, "DiT-B/8": 130_881_536,
    "DiT-L/2": 458_102_816, "DiT-L/4": 458_053_760, "DiT-L/8": 458_594_816,
    "DiT-XL/2": 675_129_632, "DiT-XL/4": 675_074_432, "DiT-XL/8": 675_683_072,
}
TOL = 1e-5  # max |ours - ref| / max |ref|, float32
TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=2,
            sample_size=8, patch_size=2, num_embeds_ada_norm=10)  # diffusers norm_eps 1e-5


def _paper_config(name):
  return dict(VARIANTS[name], input_size=32, in_channels=4, learn_sigma=True, num_classes=1000,
              class_dropout_prob=0.1)


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def test_every_paper_variant_has_a_golden_count():
  paper = {n for n in VARIANTS if re.fullmatch(r"DiT-(S|B|L|XL)/\d+", n)}
  assert paper == set(PAPER_VARIANTS) == set(OFFICIAL_PARAMS)


@pytest.mark.parametrize("name", PAPER_VARIANTS)
def test_param_count_matches_official_and_diffusers(name):
  cfg = _paper_config(name)
  ours = count_params(cdit.expected_params(cfg))
  d, p = cfg["hidden_size"], cfg["patch_size"]
  assert ours == OFFICIAL_PARAMS[name] - (32 // p) ** 2 * d  # we keep pos_embed as a constant
  with torch.device("meta"):
    ref = diffusers.DiTTransformer2DModel(
        num_attention_heads=cfg["num_heads"], attention_head_dim=d // cfg["num_heads"],
        in_channels=4, out_channels=8, num_layers=cfg["depth"], sample_size=32, patch_size=p,
        num_embeds_ada_norm=1000)
  per_block_embedders = sum(q.numel() for q in ref.transformer_blocks[0].norm1.emb.parameters())
  assert per_block_embedders == 256 * d + d + d * d + d + 1001 * d
  total = sum(q.numel() for q in ref.parameters())
  assert ours == total - (cfg["depth"] - 1) * per_block_embedders


def _random_diffusers(out_channels, seed=0):
  """A tiny diffusers DiT with every weight random (zero-inits too) and the
  per-block embedder copies made equal, as in real checkpoints."""
  torch.manual_seed(seed)
  model = diffusers.DiTTransformer2DModel(out_channels=out_channels, **TINY)
  with torch.no_grad():
    for q in model.parameters():  # fan-in scaling keeps float32 well conditioned
      torch.nn.init.normal_(q, std=q.shape[1:].numel() ** -0.5 if q.ndim > 1 else 0.2)
    state = model.state_dict()
    for k, v in state.items():
      if ".norm1.emb." in k:
        v.copy_(state["transformer_blocks.0" + k[len("transformer_blocks.N"):]])
  return model.eval()  # train mode would drop labels at random


def _inputs(seed=0, batch=4):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, 8, 8, 4)).astype(np.float32)
  t = rng.uniform(0, 1000, batch).astype(np.float32)
  y = np.array([3, 10, 0, 10])[:batch]  # 10 == num_classes: the null class
  return x, t, y


def _run_diffusers(model, x, t, y):
  with torch.no_grad():
    out = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), timestep=torch.from_numpy(t),
                class_labels=torch.from_numpy(y), return_dict=False)[0]
  return out.numpy().transpose(0, 2, 3, 1)


def _run_ours(params, cfg, x, t, y):
  return np.asarray(DiT(**cfg).apply({"params": params}, jnp.asarray(x), jnp.asarray(t),
                                     jnp.asarray(y)))


@pytest.mark.parametrize("out_channels", [8, 4])
def test_from_diffusers_matches_diffusers(tmp_path, out_channels):
  ref_model = _random_diffusers(out_channels)
  ref_model.save_pretrained(tmp_path, max_shard_size="20KB" if out_channels == 4 else "10GB")
  params, cfg = cdit.from_diffusers(str(tmp_path))  # out_channels=4: sharded + index json
  assert cfg["learn_sigma"] == (out_channels == 8) and cfg["time_freq_shift"] == 1
  assert cfg["mlp_norm_eps"] == 1e-5  # diffusers default norm_eps, carried over
  x, t, y = _inputs()
  ours, ref = _run_ours(params, cfg, x, t, y), _run_diffusers(ref_model, x, t, y)
  real, null = y < 10, y == 10
  err_real, err_null = _rel(ours[real], ref[real]), _rel(ours[null], ref[null])
  print(f"out_channels={out_channels}: rel err real labels {err_real:.2e}, null {err_null:.2e}")
  assert err_real <= TOL and err_null <= TOL


def test_to_diffusers_round_trip(tmp_path):
  cfg = cdit.diffusers_to_config(dict(TINY, out_channels=8))
  params = _random_params(cfg, 1)
  cdit.to_diffusers(params, cfg, str(tmp_path))
  loaded = diffusers.DiTTransformer2DModel.from_pretrained(str(tmp_path)).eval()
  x, t, y = _inputs(1)
  err = _rel(_run_diffusers(loaded, x, t, y), _run_ours(params, cfg, x, t, y))
  print(f"ours -> diffusers rel err {err:.2e}")
  assert err <= TOL
  back, cfg_back = cdit.from_diffusers(str(tmp_path))
  assert cfg_back == cfg
  jax.tree.map(np.testing.assert_array_equal, back, params)
  with pytest.raises(UserError, match="time_freq_shift"):
    cdit.to_diffusers(params, dict(cfg, time_freq_shift=0.0), str(tmp_path / "x"))


def test_scanned_model_loads_diffusers_and_round_trips(tmp_path):
  ref_model = _random_diffusers(8, seed=3)
  ref_model.save_pretrained(tmp_path / "in")
  flat, cfg_flat = cdit.from_diffusers(str(tmp_path / "in"))
  params, cfg = cdit.from_diffusers(str(tmp_path / "in"), scan_layers=True)
  assert cfg == dict(cfg_flat, scan_layers=True) and "blocks_0" not in params
  assert params["blocks"]["attn"]["qkv"]["kernel"].shape == (2, 32, 3, 2, 16)  # (layers, ...)
  x, t, y = _inputs(3)
  ref = _run_diffusers(ref_model, x, t, y)
  err_scan, err_flat = (_rel(_run_ours(params, cfg, x, t, y), ref),
                        _rel(_run_ours(flat, cfg_flat, x, t, y), ref))
  print(f"diffusers parity: scanned {err_scan:.2e}, unrolled {err_flat:.2e}")
  assert err_scan <= TOL and err_flat <= TOL
  cdit.to_diffusers(params, cfg, str(tmp_path / "out"))  # unstacked on export
  loaded = diffusers.DiTTransformer2DModel.from_pretrained(str(tmp_path / "out")).eval()
  np.testing.assert_array_equal(_run_diffusers(loaded, x, t, y), ref)
  back, cfg_back = cdit.from_diffusers(str(tmp_path / "out"), scan_layers=True)
  assert cfg_back == cfg
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_scanned_model_official_round_trip():
  params, cfg = _official_params()
  stacked, cfg_scan = stack_blocks(params, cfg["depth"]), dict(cfg, scan_layers=True)
  sd = cdit.to_official_state_dict(stacked, cfg_scan)
  jax.tree.map(np.testing.assert_array_equal, sd, cdit.to_official_state_dict(params, cfg))
  back, cfg_back = cdit.from_official(sd, num_heads=2, scan_layers=True)
  assert cfg_back == cfg_scan
  jax.tree.map(np.testing.assert_array_equal, back, stacked)


def test_qk_norm_models_cannot_be_converted(tmp_path):
  cfg = dict(cdit.diffusers_to_config(dict(TINY, out_channels=8)), qk_norm=True)
  params = _random_params(cfg, 5)
  assert "q_norm" in params["blocks_0"]["attn"]
  with pytest.raises(UserError, match="qk_norm=True cannot be converted .* no q_norm / k_norm"):
    cdit.to_diffusers(params, cfg, str(tmp_path))
  with pytest.raises(UserError, match="qk_norm=True cannot be converted"):
    cdit.to_official_state_dict(params, dict(cfg, time_freq_shift=0.0, mlp_norm_eps=1e-6))


def test_diffusers_copies_must_agree(tmp_path):
  model = _random_diffusers(8)
  with torch.no_grad():
    model.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight.add_(1.0)
  model.save_pretrained(tmp_path)
  with pytest.raises(UserError, match=r"copies differ: transformer_blocks\.1\.norm1\.emb"
                                      r"\.class_embedder\.embedding_table\.weight"):
    cdit.from_diffusers(str(tmp_path))


def _official_reference(sd, x, t, y, heads):
  """The official DiT forward (facebookresearch/DiT models.py) on a state dict, in torch."""
  w = {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}
  lin = lambda h, n: F.linear(h, w[n + ".weight"], w[n + ".bias"])
  norm = lambda h: F.layer_norm(h, h.shape[-1:], eps=1e-6)
  mod = lambda h, shift, scale: h * (1 + scale[:, None]) + shift[:, None]
  x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  t, y = torch.from_numpy(t), torch.from_numpy(y)
  p = w["x_embedder.proj.weight"].shape[-1]
  h = F.conv2d(x, w["x_embedder.proj.weight"], w["x_embedder.proj.bias"], stride=p)
  h = h.flatten(2).transpose(1, 2) + w["pos_embed"]
  half = 128
  freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
  args = t[:, None].float() * freqs[None]
  c = lin(F.silu(lin(torch.cat([torch.cos(args), torch.sin(args)], -1), "t_embedder.mlp.0")),
          "t_embedder.mlp.2") + w["y_embedder.embedding_table.weight"][y]
  b, n, d = h.shape
  depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
  for i in range(depth):
    s_msa, sc_msa, g_msa, s_mlp, sc_mlp, g_mlp = lin(F.silu(c), f"blocks.{i}.adaLN_modulation.1"
                                                     ).chunk(6, dim=1)
    qkv = lin(mod(norm(h), s_msa, sc_msa), f"blocks.{i}.attn.qkv")
    q, k, v = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    a = torch.softmax(q @ k.transpose(-2, -1) * (d // heads) ** -0.5, -1) @ v
    h = h + g_msa[:, None] * lin(a.transpose(1, 2).reshape(b, n, d), f"blocks.{i}.attn.proj")
    m = lin(F.gelu(lin(mod(norm(h), s_mlp, sc_mlp), f"blocks.{i}.mlp.fc1"), approximate="tanh"),
            f"blocks.{i}.mlp.fc2")
    h = h + g_mlp[:, None] * m
  shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
  h = lin(mod(norm(h), shift, scale), "final_layer.linear")
  g, co = int(n ** 0.5), h.shape[-1] // (p * p)
  h = torch.einsum("nhwpqc->nchpwq", h.reshape(b, g, g, p, p, co))
  return h.reshape(b, co, g * p, g * p).numpy().transpose(0, 2, 3, 1)


def _random_params(cfg, seed):
  """Random ldm_jax DiT params: kernels ~ N(0, 1/fan_in), vectors and tables ~ N(0, 0.04)."""
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = "/".join(k.key for k in path)
    if not name.endswith("kernel"):
      fan_in = 25
    else:  # qkv kernel is (D, 3, H, Dh); the others (..., out)
      fan_in = s.shape[0] if "qkv" in name else int(np.prod(s.shape[:-1]))
    return (rng.standard_normal(s.shape) * fan_in ** -0.5).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, nn.unbox(cdit.expected_params(cfg)))


def _official_params():
  cfg = dict(cdit.diffusers_to_config(dict(TINY, out_channels=8)), time_freq_shift=0.0,
             mlp_norm_eps=1e-6)  # the official DiT's LayerNorms
  return _random_params(cfg, 2), cfg


def test_official_pt_round_trip_and_parity(tmp_path):
  params, cfg = _official_params()
  sd = cdit.to_official_state_dict(params, cfg)
  path = tmp_path / "dit.pt"
  torch.save({"ema": {k: torch.from_numpy(v) for k, v in sd.items()}}, path)
  back, cfg_back = cdit.from_official(str(path), num_heads=2)
  assert cfg_back == cfg
  jax.tree.map(np.testing.assert_array_equal, back, params)
  x, t, y = _inputs(2)
  err = _rel(_run_ours(params, cfg, x, t, y), _official_reference(sd, x, t, y, heads=2))
  print(f"official reference rel err {err:.2e}")
  assert err <= TOL


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("blocks.1.attn.proj.bias"), r"missing: blocks\.1\.attn\.proj\.bias"),
    (lambda sd: sd.update({"blocks.0.attn.q_norm.weight": np.ones(16, np.float32)}),
     r"unused: blocks\.0\.attn\.q_norm\.weight"),
    (lambda sd: sd.update({"blocks.0.mlp.fc1.bias": np.ones(7, np.float32)}),
     r"wrong shape: blocks\.0\.mlp\.fc1\.bias is \(7,\), expected \(128,\)"),
    (lambda sd: sd.update({"pos_embed": sd["pos_embed"] * 1.01}), "pos_embed differs"),
])
def test_official_strict_errors(edit, message):
  params, cfg = _official_params()
  sd = cdit.to_official_state_dict(params, cfg)
  edit(sd)
  with pytest.raises(UserError, match=message):
    cdit.from_official(sd, num_heads=2)


def test_torch_is_optional(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  with pytest.raises(UserError, match="needs PyTorch"):
    common.load_torch_state_dict(str(tmp_path / "dit.pt"))
