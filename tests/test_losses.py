"""Autoencoder losses: LPIPS parity with the `lpips` package (on a randomly initialised
VGG16 trunk and the package's real v0.1 heads), strict weight loading, PatchGAN
parity with a PyTorch reference in train mode, and the GAN loss functions on
hand-computed numbers.

The `lpips` package imports torchvision, which must not be installed here; the tests
put a minimal stand-in `torchvision.models.vgg16` into sys.modules while importing
and building `lpips.LPIPS`, then take it out again. `lpips` itself is required
(`pip install --no-deps lpips==0.1.4`): without it these tests fail.
"""

import math
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ldm_jax.convert import common
from ldm_jax.errors import UserError
from ldm_jax.losses import gan, lpips as ours
from ldm_jax.models.registry import count_params

TOL = 1e-5  # max |ours - ref| / max |ref|, float32
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
             512, 512, 512, "M")


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


# -- LPIPS ------------------------------------------------------------------------------

def _random_vgg16_features(seed: int) -> torch.nn.Sequential:
  """torchvision VGG16 `features` layout (31 modules), random He-normal weights and
  small random biases (so activations stay O(1) through 13 layers)."""
  gen = torch.Generator().manual_seed(seed)
  layers, c_in = [], 3
  for v in VGG16_CFG:
    if v == "M":
      layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
      continue
    layer = torch.nn.Conv2d(c_in, v, kernel_size=3, padding=1)
    with torch.no_grad():
      layer.weight.normal_(0.0, math.sqrt(2.0 / (9 * c_in)), generator=gen)
      layer.bias.uniform_(-0.1, 0.1, generator=gen)
    layers += [layer, torch.nn.ReLU(inplace=True)]
    c_in = v
  return torch.nn.Sequential(*layers)


def _fake_torchvision(features: torch.nn.Sequential) -> types.ModuleType:
  tv = types.ModuleType("torchvision")
  models = types.ModuleType("torchvision.models")

  def vgg16(pretrained=None, weights=None, **kwargs):
    del pretrained, weights, kwargs  # never downloads: always the given features
    return types.SimpleNamespace(features=features)

  models.vgg16 = vgg16
  tv.models = models
  return tv


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(torch lpips.LPIPS on random VGG16, path of those VGG weights, heads path)."""
  heads = ours.lpips_heads_path()
  assert heads is not None, ("the lpips package is needed: pip install --no-deps "
                             "lpips==0.1.4 (never let pip pull torchvision)")
  features = _random_vgg16_features(seed=0)
  saved = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.models")}
  tv = _fake_torchvision(features)
  sys.modules["torchvision"], sys.modules["torchvision.models"] = tv, tv.models
  try:
    import lpips  # pylint: disable=import-outside-toplevel
    net = lpips.LPIPS(net="vgg", version="0.1", lpips=True, pretrained=True, verbose=False)
  finally:  # other tests (transformers) must not see the stand-in
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v
  assert all(a is b for a, b in zip(net.net.parameters(), features.parameters()))
  path = tmp_path_factory.mktemp("lpips") / "vgg16.pth"
  state = {f"features.{k}": v for k, v in features.state_dict().items()}
  state["classifier.0.weight"] = torch.zeros(4, 8)  # torchvision files have these: ignored
  torch.save(state, str(path))
  return net.eval(), str(path), heads


@pytest.fixture(scope="module")
def params(reference):
  _, vgg_path, heads = reference
  return ours.load_lpips_params(vgg_path, heads)


@pytest.fixture(scope="module")
def lpips_fn():
  return jax.jit(lambda p, x, y: ours.LPIPS().apply({"params": p}, x, y))


def _pairs(seed, shape):
  """x and y = x + noise of a different size per example, plus an unrelated pair."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, shape).astype(np.float32)
  levels = np.linspace(0.05, 0.6, shape[0] - 1).tolist() + [None]
  y = np.stack([np.clip(x[i] + lv * rng.standard_normal(shape[1:]), -1, 1) if lv is not None
                else rng.uniform(-1, 1, shape[1:]) for i, lv in enumerate(levels)])
  return x, y.astype(np.float32)


def test_lpips_matches_reference(reference, params, lpips_fn):
  net, _, _ = reference
  x, y = _pairs(0, (3, 64, 64, 3))
  got = np.asarray(lpips_fn(params, x, y))
  with torch.no_grad():
    want = net(_nchw(x), _nchw(y)).numpy().reshape(-1)
  print("LPIPS 3ch ours", got, "ref", want, "rel", _rel(got, want))
  assert got.shape == (3,)
  assert _rel(got, want) <= TOL
  # A meaningful comparison: clearly non-zero, different per pair, growing with noise.
  assert np.all(want > 1e-3) and np.all(np.diff(want) > 1e-3)
  assert np.asarray(lpips_fn(params, x, x)).max() < 1e-12  # rounding only


def test_lpips_one_channel(reference, params, lpips_fn):
  net, _, _ = reference
  x, y = _pairs(1, (3, 28, 28, 1))
  got = np.asarray(lpips_fn(params, x, y))
  with torch.no_grad():
    want = net(_nchw(x).repeat(1, 3, 1, 1), _nchw(y).repeat(1, 3, 1, 1)).numpy().reshape(-1)
  print("LPIPS 1ch ours", got, "ref", want, "rel", _rel(got, want))
  assert _rel(got, want) <= TOL
  assert np.all(want > 1e-3) and np.all(np.diff(want) > 1e-3)


def test_unit_normalisation_gradient_at_zero():
  """A feature vector of exact zeros (all ReLUs off) keeps gradients finite."""
  f = jnp.array([[[[0.0, 0.0, 0.0], [3.0, 0.0, 4.0]]]])
  value, grad = jax.jit(jax.value_and_grad(lambda v: jnp.sum(ours._unit(v) * jnp.arange(3.0))))(f)
  assert float(value) == pytest.approx(1.6, rel=1e-6)  # (0.6, 0, 0.8) . (0, 1, 2)
  assert np.all(np.isfinite(grad)) and float(jnp.abs(grad).max()) > 0


def test_lpips_params_tree_and_axes(params):
  variables = jax.eval_shape(ours.LPIPS().init, jax.random.key(0),
                             jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 16, 16, 3)))
  common.check_tree_matches(params, variables, what="lpips")  # raises on any mismatch
  axes = nn.get_partition_spec(variables)["params"]
  assert tuple(axes["vgg"]["conv3_2"]["kernel"]) == (None, None, "conv_in", "conv_out")
  assert tuple(axes["lin4"]["kernel"]) == (None, None, "conv_in", "conv_out")
  assert count_params(params) == 14_714_688 + sum(ours.TAP_CHANNELS)


def test_lpips_safetensors_weights(reference, params, tmp_path):
  _, vgg_path, heads = reference
  tensors = common.load_torch_state_dict(vgg_path)
  path = str(tmp_path / "vgg16.safetensors")
  common.save_safetensors(tensors, path)
  again = ours.load_lpips_params(path, heads)
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)


def test_lpips_loading_is_strict(reference, tmp_path):
  _, vgg_path, heads = reference
  tensors = common.load_torch_state_dict(vgg_path)

  def load(changes, name):
    path = str(tmp_path / name)
    common.save_safetensors({**{k: v for k, v in tensors.items() if k not in changes},
                             **{k: v for k, v in changes.items() if v is not None}}, path)
    return ours.load_lpips_params(path, heads)

  with pytest.raises(UserError, match=r"missing: features\.28\.bias"):
    load({"features.28.bias": None}, "missing.safetensors")
  with pytest.raises(UserError, match=r"wrong shape: features\.5\.weight"):
    load({"features.5.weight": np.zeros((128, 64, 5, 5), np.float32)}, "shape.safetensors")
  with pytest.raises(UserError, match=r"unused: features\.30\.weight"):
    load({"features.30.weight": np.zeros((3,), np.float32)}, "extra.safetensors")
  with pytest.raises(UserError, match=r"missing: lin0\.model\.1\.weight"):
    ours.load_lpips_params(vgg_path, vgg_path)  # VGG file given as the heads


def test_lpips_missing_files(reference, tmp_path):
  _, vgg_path, heads = reference
  absent = str(tmp_path / "nowhere" / "vgg16-397923af.pth")
  with pytest.raises(UserError, match=r"nowhere/vgg16-397923af\.pth.*torchvision VGG16"):
    ours.load_lpips_params(absent, heads)
  with pytest.raises(UserError, match=r"nowhere/vgg16-397923af\.pth.*weights/v0\.1/vgg\.pth"):
    ours.load_lpips_params(vgg_path, absent)
  assert ours.lpips_heads_path().endswith("weights/v0.1/vgg.pth")


def test_lpips_input_errors(params):
  a = jnp.zeros((1, 16, 16, 3))
  with pytest.raises(UserError, match="one shape"):
    ours.LPIPS().apply({"params": params}, a, jnp.zeros((1, 16, 16, 1)))
  with pytest.raises(UserError, match="1 or 3 channels"):
    ours.LPIPS().apply({"params": params}, jnp.zeros((1, 16, 16, 2)), jnp.zeros((1, 16, 16, 2)))
  with pytest.raises(UserError, match="at least 16x16"):
    ours.LPIPS().apply({"params": params}, jnp.zeros((1, 8, 16, 3)), jnp.zeros((1, 8, 16, 3)))


# -- PatchGAN -----------------------------------------------------------------------------

NDF, GROUPS = 32, 16  # parity widths: 32 .. 256 (the default 64 only for the count)


def _torch_patchgan(c_in, ndf, n_layers, norm):
  """The pix2pix / taming NLayerDiscriminator layout from torch.nn primitives."""
  def make_norm(c):
    return {"batch": lambda: torch.nn.BatchNorm2d(c, eps=1e-5),
            "group": lambda: torch.nn.GroupNorm(GROUPS, c, eps=1e-5),
            "none": torch.nn.Identity}[norm]()
  layers = [torch.nn.Conv2d(c_in, ndf, 4, stride=2, padding=1), torch.nn.LeakyReLU(0.2, True)]
  width = ndf
  for n in range(1, n_layers + 1):
    prev, width = width, ndf * min(2 ** n, 8)
    layers += [torch.nn.Conv2d(prev, width, 4, stride=2 if n < n_layers else 1, padding=1,
                               bias=norm != "batch"),
               make_norm(width), torch.nn.LeakyReLU(0.2, True)]
  layers.append(torch.nn.Conv2d(width, 1, 4, stride=1, padding=1))
  return torch.nn.Sequential(*layers).train()


def _copy_into_torch(params, model, n_layers):
  """Our params -> the torch Sequential (conv_0 at 0, block n at 2 + 3 (n - 1))."""
  p = nn.unbox(params)
  pairs = [("conv_0", 0, None)] + [(f"conv_{n}", 2 + 3 * (n - 1), f"norm_{n}")
                                   for n in range(1, n_layers + 1)]
  pairs.append(("conv_out", 2 + 3 * n_layers, None))
  with torch.no_grad():
    for conv_name, idx, norm_name in pairs:
      layer = model[idx]
      kernel = np.array(p[conv_name]["kernel"]).transpose(3, 2, 0, 1)  # HWIO -> OIHW
      layer.weight.copy_(torch.from_numpy(kernel.copy()))
      assert (layer.bias is None) == ("bias" not in p[conv_name])
      if layer.bias is not None:
        layer.bias.copy_(torch.from_numpy(np.array(p[conv_name]["bias"])))
      if norm_name in p:
        model[idx + 1].weight.copy_(torch.from_numpy(np.array(p[norm_name]["scale"])))
        model[idx + 1].bias.copy_(torch.from_numpy(np.array(p[norm_name]["bias"])))


def _random_params(model, x, seed):
  """Random parameters of `model` in numpy (jitting Flax's init costs seconds of
  compilation per layout): He-scaled kernels, scales around 1, non-zero biases."""
  rng = np.random.default_rng(seed)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x)["params"])

  def f(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "kernel":
      value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:3]))
    elif name == "scale":
      value = rng.uniform(0.5, 1.5, shape)
    else:
      value = 0.1 * rng.standard_normal(shape)
    return jnp.asarray(value, jnp.float32)
  return jax.tree_util.tree_map_with_path(f, shapes)


@pytest.mark.parametrize("n_layers,norm,channels,size", [
    (1, "batch", 3, 64), (2, "batch", 3, 64), (3, "batch", 3, 64),
    (1, "batch", 1, 28), (2, "batch", 1, 28), (3, "batch", 1, 28),
    (2, "group", 3, 64), (2, "none", 1, 28)])
def test_patchgan_matches_torch(n_layers, norm, channels, size):
  x = np.random.default_rng(n_layers).uniform(-1, 1, (4, size, size, channels)).astype(np.float32)
  model = gan.NLayerDiscriminator(ndf=NDF, n_layers=n_layers, norm=norm, groups=GROUPS)
  params = _random_params(model, x, seed=n_layers)
  got = np.asarray(jax.jit(model.apply)({"params": params}, x))
  ref = _torch_patchgan(channels, NDF, n_layers, norm)
  _copy_into_torch(params, ref, n_layers)
  assert count_params(params) == sum(q.numel() for q in ref.parameters())
  with torch.no_grad():
    want = _nhwc(ref(_nchw(x)))
  print(n_layers, norm, channels, size, "->", got.shape, "rel", _rel(got, want))
  assert got.shape == want.shape
  assert _rel(got, want) <= TOL


def test_patchgan_default_params_and_init():
  x = jnp.zeros((2, 32, 32, 3))
  shapes = jax.eval_shape(gan.NLayerDiscriminator().init, jax.random.key(0), x)
  assert set(shapes) == {"params"}  # no running statistics
  reference = _torch_patchgan(3, 64, 3, "batch")
  assert count_params(shapes) == sum(q.numel() for q in reference.parameters())
  assert count_params(shapes) == gan.DEFAULT_NUM_PARAMS
  axes = nn.get_partition_spec(shapes)["params"]
  assert tuple(axes["conv_2"]["kernel"]) == (None, None, "conv_in", "conv_out")
  assert tuple(axes["norm_2"]["scale"]) == ("norm",)
  assert "bias" not in shapes["params"]["conv_1"]
  # taming's weights_init: N(0, 0.02) kernels, N(1, 0.02) norm scales, zero biases.
  key = jax.random.key(0, impl="rbg")  # compiles in a fraction of threefry's time
  params = nn.unbox(jax.jit(gan.NLayerDiscriminator(ndf=8).init)(key, x))
  kernel = np.asarray(params["params"]["conv_3"]["kernel"])  # 32 -> 64, 4x4: 32k samples
  assert abs(kernel.mean()) < 1e-3 and abs(kernel.std() - 0.02) < 1e-3
  scale = np.asarray(params["params"]["norm_3"]["scale"])
  assert abs(scale.mean() - 1) < 0.01 and 0.01 < scale.std() < 0.03
  assert not np.any(np.asarray(params["params"]["norm_3"]["bias"]))
  assert not np.any(np.asarray(params["params"]["conv_out"]["bias"]))


def test_patchgan_batch_norm_is_global_under_sharding():
  """Batch statistics span the whole batch when it is sharded over the 8 devices."""
  x = np.random.default_rng(7).uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32)
  x[:4] += 1.0  # devices' shards differ in mean: per-shard statistics would show
  model = gan.NLayerDiscriminator(ndf=8, n_layers=2)
  params = _random_params(model, x, seed=7)
  apply = jax.jit(model.apply)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  whole = np.asarray(apply({"params": params}, x))
  np.testing.assert_allclose(np.asarray(apply({"params": params}, sharded)), whole,
                             rtol=1e-5, atol=1e-6)
  alone = np.asarray(apply({"params": params}, x[:1]))  # one example's own statistics
  assert np.max(np.abs(alone - whole[:1])) > 1e-2


def test_patchgan_errors():
  x = jnp.zeros((1, 32, 32, 3))
  with pytest.raises(UserError, match=r"'layer'.*valid: \['batch', 'group', 'none'\]"):
    jax.eval_shape(gan.NLayerDiscriminator(norm="layer").init, jax.random.key(0), x)
  with pytest.raises(UserError, match="not divisible by groups=32"):
    jax.eval_shape(gan.NLayerDiscriminator(ndf=8, norm="group").init, jax.random.key(0), x)


# -- GAN losses ---------------------------------------------------------------------------

REAL = jnp.array([0.5, 2.0, -1.0])
FAKE = jnp.array([-2.0, 0.0, 1.0])


def _softplus(v):
  return math.log1p(math.exp(v))


def test_hinge_d_loss():
  # relu(1 - real) = [0.5, 0, 2] -> 5/6; relu(1 + fake) = [0, 1, 2] -> 1.
  assert float(gan.hinge_d_loss(REAL, FAKE)) == pytest.approx(0.5 * (5 / 6 + 1), rel=1e-6)
  assert float(gan.d_loss("hinge", REAL, FAKE)) == pytest.approx(11 / 12, rel=1e-6)


def test_vanilla_d_loss():
  want = 0.5 * ((_softplus(-0.5) + _softplus(-2.0) + _softplus(1.0)) / 3
                + (_softplus(-2.0) + _softplus(0.0) + _softplus(1.0)) / 3)
  assert want == pytest.approx(0.6746005, abs=1e-6)
  assert float(gan.vanilla_d_loss(REAL, FAKE)) == pytest.approx(want, rel=1e-6)
  assert float(gan.d_loss("vanilla", REAL, FAKE)) == pytest.approx(want, rel=1e-6)


def test_generator_loss_and_d_loss_errors():
  assert float(gan.generator_loss(jnp.array([[1.0, 2.0], [3.0, -2.0]]))) == -1.0
  assert set(gan.D_LOSSES) == {"hinge", "vanilla"}
  with pytest.raises(UserError, match=r"'wgan'.*valid: \['hinge', 'vanilla'\]"):
    gan.d_loss("wgan", REAL, FAKE)


def test_adaptive_weight():
  rec, fake = jnp.array([[3.0], [4.0]]), jnp.array([[0.6], [0.8]])  # norms 5 and 1
  assert float(gan.adaptive_weight(rec, fake)) == pytest.approx(5 / (1 + 1e-4), rel=1e-6)
  assert float(gan.adaptive_weight(rec, fake, delta=1.0)) == pytest.approx(2.5, rel=1e-6)
  assert float(gan.adaptive_weight(rec, jnp.zeros((2, 1)))) == 1e4  # 5e4 clipped
  assert float(gan.adaptive_weight(rec, fake, max_weight=2.0)) == 2.0
  grads = jax.grad(lambda r, f: gan.adaptive_weight(r, f), argnums=(0, 1))(rec, fake)
  assert all(not np.any(np.asarray(g)) for g in grads)  # stop_gradient
