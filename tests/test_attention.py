"""Attention backends (`ldm_jax.models.attention`) and `layers.Attention`: the xla
path against float64 numpy and `jax.nn.dot_product_attention`, the Pallas kernels
in interpret mode (also under an 8-device mesh through shard_map), the errors for
backends this CPU cannot run, and q/k RMSNorm against a hand-written reference."""

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.errors import UserError
from ldm_jax.models import attention
from ldm_jax.models.layers import Attention

TOL = 1e-5  # max |ours - ref| / max |ref|, float32


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _qkv(seed=0, shape=(2, 32, 4, 16)):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3)]


def _numpy_attention(q, k, v):
  """float64 softmax(q k^T / sqrt(Dh)) v on (B, T, H, Dh)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", weights, v)


def test_xla_matches_float64_numpy_and_jax_nn():
  q, k, v = _qkv()
  ours = attention.dot_product_attention(q, k, v, backend="xla")
  err_np = _rel(ours, _numpy_attention(q, k, v))
  err_jax = _rel(ours, jax.nn.dot_product_attention(q, k, v, implementation="xla"))
  print(f"xla vs float64 numpy {err_np:.2e}, vs jax.nn xla {err_jax:.2e}")
  assert ours.dtype == jnp.float32 and ours.shape == q.shape
  assert err_np <= TOL and err_jax <= TOL


@pytest.mark.parametrize("kernel", ["gpu", "tpu"])
def test_pallas_interpret_matches_xla_forward_and_gradient(kernel):
  q, k, v = _qkv(1, (2, 128, 2, 16) if kernel == "tpu" else (2, 32, 4, 16))  # TPU: 128-multiple
  run = lambda backend, **kw: lambda q, k, v: attention.dot_product_attention(
      q, k, v, backend=backend, **kw)
  pallas = run("pallas", interpret=True, pallas_kernel=kernel)
  xla = run("xla")
  err = _rel(pallas(q, k, v), xla(q, k, v))
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
  grads = jax.grad(loss(pallas), argnums=(0, 1, 2))(q, k, v)
  grads_ref = jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)
  err_grad = max(_rel(g, r) for g, r in zip(grads, grads_ref))
  print(f"pallas {kernel} interpret vs xla: output {err:.2e}, gradients {err_grad:.2e}")
  assert err <= TOL and err_grad <= TOL


_MESH_SCRIPT = textwrap.dedent("""
    import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from ldm_jax.models import attention
    from ldm_jax.models.layers import Attention
    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((4, 128, 4, 16)), jnp.float32) for _ in range(3))
    for kernel in ("gpu", "tpu"):
      f = jax.jit(lambda q, k, v: attention.dot_product_attention(
          q, k, v, backend="pallas", interpret=True, pallas_kernel=kernel))
      with jax.set_mesh(mesh):
        spec = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
        qs, ks, vs = (jax.device_put(a, spec) for a in (q, k, v))
        assert "shard_map" in str(jax.make_jaxpr(f)(qs, ks, vs))
        out = f(qs, ks, vs)
      ref = attention.dot_product_attention(q, k, v, backend="xla")
      err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
      print(f"MESH {kernel} {err:.3e}")

    # The layer inside nn.scan + nn.remat (as DiT scan_layers + remat), loss and gradients.
    class Step(nn.Module):
      backend: str
      @nn.compact
      def __call__(self, x, _):
        return x + Attention(4, qk_norm=True, backend=self.backend, interpret=True)(x), None
    def stack(backend):
      return nn.scan(nn.remat(Step, prevent_cse=False), variable_axes={"params": 0},
                     split_rngs={"params": True}, length=2,
                     metadata_params={nn.PARTITION_NAME: "layers"})(backend)
    x = q.reshape(4, 128, 64)
    params = nn.unbox(stack("xla").init(jax.random.key(0), x, None)["params"])
    def loss_and_grads(backend, x):
      loss = lambda p: jnp.sum(jnp.sin(stack(backend).apply({"params": p}, x, None)[0]))
      return jax.jit(jax.value_and_grad(loss))(params)
    ref = loss_and_grads("xla", x)
    with jax.set_mesh(mesh):
      out = loss_and_grads("pallas", jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp")))))
    rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
    err = max([rel(out[0], ref[0])] + jax.tree.leaves(jax.tree.map(rel, out[1], ref[1])))
    print(f"MESH scan_remat_grads {err:.3e}")
""")


def test_pallas_interpret_under_8_device_mesh_uses_shard_map():
  """Both kernels on sharded inputs; then the Attention layer scanned and rematerialised
  as DiT does, loss and gradients (the Triton kernel's interpreter)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], env=env, capture_output=True,
                        text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  errors = {line.split()[1]: float(line.split()[2])
            for line in done.stdout.splitlines() if line.startswith("MESH")}
  print(f"8-device mesh (data 2, fsdp 2, tensor 2), pallas interpret vs xla: {errors}")
  assert set(errors) == {"gpu", "tpu", "scan_remat_grads"} and max(errors.values()) <= TOL


def test_mesh_axes_for_attention():
  assert attention.mesh_axes_for_attention(("dcn_data", "data", "fsdp", "tensor", "seq")) == (
      ("dcn_data", "data", "fsdp"), "tensor")
  assert attention.mesh_axes_for_attention(("data",)) == (("data",), None)


@pytest.mark.parametrize("backend, message", [
    ("cudnn", r"'cudnn' needs a CUDA GPU.*valid here: \['auto', 'xla'\]"),
    ("pallas", r"'pallas' needs a GPU or TPU \(or interpret=True\).*valid here: \['auto', 'xla'\]"),
    ("flash", r"unknown attention backend 'flash'; valid: \['xla', 'cudnn', 'pallas', 'auto'\]"),
])
def test_backends_this_cpu_cannot_run_are_clear_errors(backend, message):
  q, k, v = _qkv()
  with pytest.raises(UserError, match=message):
    attention.dot_product_attention(q, k, v, backend=backend)


def test_auto_resolves_by_platform():
  q, k, v = _qkv()
  assert attention.resolve_backend("auto") == "xla"  # this CPU
  np.testing.assert_array_equal(attention.dot_product_attention(q, k, v, backend="auto"),
                                attention.dot_product_attention(q, k, v, backend="xla"))
  assert attention.resolve_backend("auto", jnp.bfloat16, "gpu") == "cudnn"
  assert attention.resolve_backend("auto", jnp.float32, "gpu") == "xla"  # cudnn: 16-bit only
  assert attention.resolve_backend("auto", jnp.float32, "tpu", tokens=256) == "pallas"
  assert attention.resolve_backend("auto", jnp.float32, "tpu", tokens=64) == "xla"  # kernel: 128k


def _random_attention_params(module, x, seed):
  """Init `module`, then replace every parameter (norm scales too) by random values."""
  params = nn.unbox(module.init(jax.random.key(0), x)["params"])
  rng = np.random.default_rng(seed)
  leaves, tree = jax.tree.flatten(params)
  leaves = [jnp.asarray(rng.uniform(0.5, 1.5, p.shape) if p.ndim == 1 and p.shape[0] == 16
                        else rng.standard_normal(p.shape) * 0.2, jnp.float32) for p in leaves]
  return jax.tree.unflatten(tree, leaves)


def _reference_attention_layer(params, x, heads, qk_norm):
  """float64 numpy: fused qkv -> (RMSNorm q, k over head dim) -> attention -> proj."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  qkv = np.einsum("btd,dshe->btshe", np.asarray(x, np.float64), p["qkv"]["kernel"])
  q, k, v = (qkv[:, :, i] + p["qkv"]["bias"][i] for i in range(3))
  if qk_norm:
    rms = lambda a, scale: a / np.sqrt(np.mean(a * a, -1, keepdims=True) + 1e-6) * scale
    q, k = rms(q, p["q_norm"]["scale"]), rms(k, p["k_norm"]["scale"])
  out = _numpy_attention(q, k, v)
  return np.einsum("bthe,hed->btd", out, p["proj"]["kernel"]) + p["proj"]["bias"]


@pytest.mark.parametrize("qk_norm", [True, False])
def test_attention_layer_matches_reference(qk_norm):
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 16, 64)) * 3, jnp.float32)
  layer = Attention(4, qk_norm=qk_norm)
  params = _random_attention_params(layer, x, 4)
  assert ("q_norm" in params) == qk_norm
  if qk_norm:
    boxed = layer.init(jax.random.key(0), x)["params"]
    assert boxed["q_norm"]["scale"].names == ("kv",) == boxed["k_norm"]["scale"].names
    assert params["q_norm"]["scale"].shape == (16,)
  ours = layer.apply({"params": params}, x)
  err = _rel(ours, _reference_attention_layer(params, x, 4, qk_norm))
  print(f"Attention(qk_norm={qk_norm}) vs float64 reference: {err:.2e}")
  assert err <= TOL


def test_attention_layer_without_knobs_is_bit_identical_to_the_original_formula():
  x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 16, 64)), jnp.float32)
  layer = Attention(4)
  params = _random_attention_params(layer, x, 6)
  ours = layer.apply({"params": params}, x)
  # The einsum / float32-softmax code that layers.Attention had before backends existed.
  qkv = nn.DenseGeneral((3, 4, 16)).apply({"params": params["qkv"]}, x)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(16)
  weights = jax.nn.softmax(logits, axis=-1).astype(jnp.float32)
  out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
  ref = nn.DenseGeneral(64, axis=(-2, -1)).apply({"params": params["proj"]}, out)
  np.testing.assert_array_equal(ours, ref)


def test_attention_layer_pallas_interpret_matches_xla():
  x = jnp.asarray(np.random.default_rng(7).standard_normal((2, 16, 64)), jnp.float32)
  layer = Attention(4, qk_norm=True)
  params = _random_attention_params(layer, x, 8)
  ref = layer.apply({"params": params}, x)
  out = Attention(4, qk_norm=True, backend="pallas", interpret=True).apply({"params": params}, x)
  err = _rel(out, ref)
  print(f"Attention layer pallas interpret vs xla: {err:.2e}")
  assert err <= TOL
