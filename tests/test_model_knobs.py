"""DiT precision / memory / backend knobs, each checked with real numbers on a tiny
DiT: bfloat16 compute against float32, remat policies and nn.scan against the
plain model (outputs, loss and gradients), stack/unstack of block params, and the
errors for unknown names."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ldm_jax.errors import UserError
from ldm_jax.models import dit
from ldm_jax.models.dit import DiT, stack_blocks, unstack_blocks

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
            num_classes=10)
BF16_TOL = 3e-2  # bfloat16 vs float32 output; measured 6.2e-3 (8 mantissa bits: ~4e-3 a step)
EXACT_TOL = 1e-6  # same math, different program (remat, scan)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _tree_rel(a, b):
  return max(jax.tree.leaves(jax.tree.map(_rel, a, b)))


def _inputs(batch=4, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((batch, 8, 8, 4)), jnp.float32)
  t = jnp.asarray(rng.uniform(0, 1000, batch), jnp.float32)
  y = jnp.asarray(np.arange(batch) % 11)  # 10 == the null class
  return x, t, y


def _random_params(model, seed=0):
  """Init `model`, then draw every parameter at random (N(0, 1/fan_in) kernels,
  N(0, 0.04) vectors) so adaLN-Zero and the zero final layer do not hide anything."""
  params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *_inputs(1))["params"])
  rng = np.random.default_rng(seed)

  def draw(path, p):
    name = "/".join(k.key for k in path)
    layers = 1 if "blocks/" in name and model.scan_layers else 0  # leading layer axis
    shape = p.shape[layers:]
    if not name.endswith("kernel"):
      scale = 0.2
    else:
      scale = (shape[0] if "qkv" in name else int(np.prod(shape[:-1]))) ** -0.5
    return jnp.asarray(rng.standard_normal(p.shape) * scale, jnp.float32)
  return jax.tree_util.tree_map_with_path(draw, params)


def _apply(model, params, x, t, y):
  return jax.jit(model.apply)({"params": params}, x, t, y)


def _loss_and_grads(model, params):
  x, t, y = _inputs()
  target = jnp.asarray(np.random.default_rng(9).standard_normal((4, 8, 8, 8)), jnp.float32)
  loss = lambda p: jnp.mean((model.apply({"params": p}, x, t, y) - target) ** 2)
  return jax.jit(jax.value_and_grad(loss))(params)


def test_bfloat16_compute_is_close_to_float32_with_float32_params_and_output():
  model32, model16 = DiT(**TINY), DiT(**TINY, dtype=jnp.bfloat16)
  boxed = jax.eval_shape(model16.init, jax.random.key(0), *_inputs(1))["params"]
  assert {p.dtype for p in jax.tree.leaves(nn.unbox(boxed))} == {jnp.dtype(jnp.float32)}
  params = _random_params(model32)
  x, t, y = _inputs()
  out32 = _apply(model32, params, x, t, y)
  out16 = _apply(model16, params, x, t, y)
  assert out16.dtype == jnp.float32
  err = _rel(out16, out32)
  print(f"bfloat16 vs float32 DiT output: max rel diff {err:.2e} (tolerance {BF16_TOL})")
  assert 0 < err <= BF16_TOL  # > 0: bfloat16 really was used


def test_build_takes_dtype_names_and_rejects_others():
  config = ml_collections.ConfigDict(dict(name="dit", variant="DiT-tiny/2", input_size=8,
                                          dtype="bfloat16", qk_norm=True, remat="full",
                                          scan_layers=True, attention="auto"))
  model = dit.build(config)
  assert model.dtype == jnp.bfloat16 and model.qk_norm and model.remat == "full"
  assert model.scan_layers and model.attention == "auto"
  assert dit.build(ml_collections.ConfigDict(dict(name="dit", variant="DiT-tiny/2",
                                                  input_size=8))).dtype == jnp.float32
  config.dtype = "float16"
  with pytest.raises(UserError, match=r"unknown dtype 'float16'; valid: \['bfloat16', 'float32'\]"):
    dit.build(config)


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_gives_the_same_loss_and_gradients(policy):
  plain = DiT(**TINY)
  params = _random_params(plain)
  loss, grads = _loss_and_grads(plain, params)
  loss_r, grads_r = _loss_and_grads(DiT(**TINY, remat=policy), params)
  err_loss, err_grads = _rel(loss_r, loss), _tree_rel(grads_r, grads)
  print(f"remat={policy}: loss rel diff {err_loss:.2e}, gradients {err_grads:.2e}")
  assert err_loss <= EXACT_TOL and err_grads <= EXACT_TOL


def test_remat_and_attention_names_are_checked():
  x, t, y = _inputs(1)
  with pytest.raises(UserError, match=r"unknown remat policy 'some'; valid: \['none', 'full', "
                     r"'dots_saveable', 'dots_with_no_batch_dims_saveable', 'nothing_saveable', "
                     r"'everything_saveable'\]"):
    DiT(**TINY, remat="some").init(jax.random.key(0), x, t, y)
  with pytest.raises(UserError, match=r"unknown attention backend 'flash'; valid: \['xla', "
                     r"'cudnn', 'pallas', 'auto'\]"):
    DiT(**TINY, attention="flash").init(jax.random.key(0), x, t, y)
  with pytest.raises(UserError, match="'cudnn' needs a CUDA GPU"):
    DiT(**TINY, attention="cudnn").init(jax.random.key(0), x, t, y)


def test_auto_attention_on_cpu_is_the_xla_path():
  params = _random_params(DiT(**TINY))
  x, t, y = _inputs()
  np.testing.assert_array_equal(_apply(DiT(**TINY, attention="auto"), params, x, t, y),
                                _apply(DiT(**TINY), params, x, t, y))


def test_stack_and_unstack_blocks_round_trip_and_match_the_scanned_tree():
  params = _random_params(DiT(**TINY))
  stacked = stack_blocks(params, TINY["depth"])
  assert "blocks_0" not in stacked
  assert stacked["blocks"]["attn"]["qkv"]["kernel"].shape == (2, 64, 3, 4, 16)
  scanned = DiT(**TINY, scan_layers=True)
  want = jax.eval_shape(scanned.init, jax.random.key(0), *_inputs(1))["params"]
  assert (jax.tree.map(lambda a: a.shape, nn.unbox(want))
          == jax.tree.map(lambda a: a.shape, stacked))
  assert want["blocks"]["attn"]["qkv"]["kernel"].names == ("layers", "embed", None, "heads", "kv")
  jax.tree.map(np.testing.assert_array_equal, unstack_blocks(stacked), params)
  with pytest.raises(UserError, match="lack"):
    stack_blocks(stacked, 2)
  with pytest.raises(UserError, match="beyond depth 1"):
    stack_blocks(params, 1)


@pytest.mark.parametrize("remat", ["none", "dots_saveable"])
def test_scan_layers_matches_unrolled_blocks(remat):
  plain = DiT(**TINY, qk_norm=True)
  params = _random_params(plain)
  stacked = stack_blocks(params, TINY["depth"])
  scanned = DiT(**TINY, qk_norm=True, scan_layers=True, remat=remat)
  x, t, y = _inputs()
  err_out = _rel(_apply(scanned, stacked, x, t, y),
                 _apply(plain, params, x, t, y))
  loss, grads = _loss_and_grads(plain, params)
  loss_s, grads_s = _loss_and_grads(scanned, stacked)
  err_grads = _tree_rel(unstack_blocks(grads_s), grads)
  print(f"scan_layers (remat={remat}) vs unrolled: output {err_out:.2e}, "
        f"loss {_rel(loss_s, loss):.2e}, gradients {err_grads:.2e}")
  assert err_out <= EXACT_TOL and _rel(loss_s, loss) <= EXACT_TOL and err_grads <= EXACT_TOL


def test_bfloat16_scan_with_remat_runs_and_stays_close():
  params = _random_params(DiT(**TINY))
  stacked = stack_blocks(params, TINY["depth"])
  x, t, y = _inputs()
  ref = _apply(DiT(**TINY), params, x, t, y)
  out = _apply(DiT(**TINY, dtype=jnp.bfloat16, scan_layers=True, remat="full"), stacked,
               x, t, y)
  err = _rel(out, ref)
  print(f"bfloat16 + scan + remat vs float32: {err:.2e}")
  assert out.dtype == jnp.float32 and err <= BF16_TOL


def test_a_knob_the_model_lacks_is_an_error_not_ignored():
  from ldm_jax.models import build_model
  from tests.helpers import tiny_config
  config = tiny_config(**{"model.remat": "full"})  # the compact U-Net has no remat
  with pytest.raises(UserError, match=r"model.remat='full' is not available for "
                                      r"model.name='compact_unet'"):
    build_model(config.model, input_size=28, in_channels=1, num_classes=10)
  config = tiny_config(**{"model.dtype": "bfloat16"})  # it has a compute dtype
  assert build_model(config.model, input_size=28, in_channels=1,
                     num_classes=10).dtype == jnp.bfloat16
