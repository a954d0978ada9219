"""Sharded training on 8 CPU devices: mesh equivalence for every denoiser, parameters
born sharded, the silent-replication check, mesh/rule parsing, activation
constraints, gradient accumulation and the NaN guard."""

import jax
import ml_collections
import numpy as np
import pytest

from ldm_jax.errors import UserError
from ldm_jax.training import sharding
from ldm_jax.training.setup import build_training
from tests.helpers import tiny_config
from tests.mesh_equivalence import (assert_mesh_equivalence, fixed_batches,
                                    max_relative_difference, train_steps)


def dit_config(**overrides):
  """DiT-tiny/2 on 8x8x4 latent-sized inputs (16 tokens): quick to compile 5 times."""
  return tiny_config(**{"model.name": "dit", "model.variant": "DiT-tiny/2",
                        "data.image_size": 8, "data.channels": 4, **overrides})


ONE_DEVICE = ((1, 1, 1),)


def spec(sharding):
  """A sharding's PartitionSpec without trailing Nones."""
  entries = list(sharding.spec)
  while entries and entries[-1] is None:
    entries.pop()
  return tuple(entries)


@pytest.mark.parametrize("make_config", [dit_config, tiny_config], ids=["dit", "compact_unet"])
def test_meshes_match_one_device(make_config):
  report = assert_mesh_equivalence(make_config())
  print({str(k): f"loss {v[0]:.1e}, params {v[1]:.1e}" for k, v in report.items()})


def test_parameters_are_born_sharded_by_the_rules():
  setup = build_training(dit_config(**{"mesh.shape": (1, 4, 2)}))
  params = setup.init_state().params
  qkv = params["blocks_0"]["attn"]["qkv"]["kernel"]  # (embed, 3, heads, kv)
  assert spec(qkv.sharding) == ("fsdp", None, "tensor")
  assert len(qkv.addressable_shards) == 8
  assert qkv.addressable_shards[0].data.shape == (64 // 4, 3, 4 // 2, 16)
  fc1 = params["blocks_0"]["mlp"]["fc1"]["kernel"]  # (embed, mlp)
  assert fc1.addressable_shards[0].data.shape == (16, 128)
  # Adam's moments and the EMA follow the params.
  state_shardings = setup.state_shardings
  assert state_shardings.ema_params["blocks_0"]["attn"]["qkv"]["kernel"] == qkv.sharding
  mu = state_shardings.opt_state[1][0].mu["blocks_0"]["attn"]["qkv"]["kernel"]
  assert mu == qkv.sharding


def test_axes_that_do_not_divide_a_dimension_are_dropped():
  """The compact U-Net's 4-channel stem input (2x2 unshuffle of 1 channel) cannot split
  8 ways over fsdp: that dimension stays whole instead of failing to compile, while the
  16-channel convolutions are split."""
  config = tiny_config(**{"mesh.shape": (1, 8, 1), "mesh.max_replicated_size": 0})
  config.mesh.rules = tuple(r if r[0] != "conv_in" else ("conv_in", "fsdp")
                            for r in config.mesh.rules)
  setup = build_training(config)
  specs = {jax.tree_util.keystr(p, simple=True, separator="/"): s.spec
           for p, s in jax.tree_util.tree_flatten_with_path(setup.state_shardings.params)[0]}
  assert tuple(specs["stem/kernel"])[2:3] in ((None,), ())
  assert specs["down_0_0/conv1/kernel"][2] == "fsdp"


def test_axes_of_size_one_count_as_replicated():
  """A spec naming only size-1 mesh axes splits nothing: the default rules put the
  compact U-Net's conv kernels on `tensor` (size 1 here), so on an 8-way fsdp mesh they
  are whole on every device and the check names them."""
  config = tiny_config(**{"mesh.shape": (1, 8, 1), "mesh.max_replicated_size": 1000})
  with pytest.raises(UserError, match=r"would be fully replicated.*down_0_0/conv1/kernel"):
    build_training(config)
  replicated = jax.sharding.NamedSharding(sharding.make_mesh(config.mesh),
                                          jax.sharding.PartitionSpec(None, "tensor"))
  assert sharding.is_replicated(replicated)


def test_replicated_large_parameters_fail_before_training():
  config = dit_config(**{"mesh.shape": (1, 8, 1), "mesh.max_replicated_size": 4096})
  config.mesh.rules = tuple((name, "" if name in ("embed", "mlp", "heads") else axes)
                            for name, axes in config.mesh.rules)
  with pytest.raises(UserError) as error:
    build_training(config)
  message = str(error.value)
  assert "fully replicated" in message and "['fsdp']" in message
  assert "blocks_0/attn/qkv/kernel (64, 3, 4, 16)" in message
  assert "mesh.max_replicated_size" in message
  config.mesh.max_replicated_size = 0  # the check can be turned off
  build_training(config)
  # With no fsdp / tensor axis replication is expected and not an error.
  config.mesh.max_replicated_size = 4096
  config.mesh.shape = (8, 1, 1)
  build_training(config)


def test_the_default_rules_replicate_nothing_large_on_an_fsdp_mesh():
  """Every DiT matrix with a model-width axis is split over fsdp; the largest whole one
  is the timestep embedder's (256 frequencies, 64) input kernel (its output axis is
  `mlp`, i.e. tensor)."""
  setup = build_training(dit_config(**{"mesh.shape": (1, 8, 1),
                                        "mesh.max_replicated_size": 256 * 64}))
  assert setup.mesh.shape["fsdp"] == 8
  with pytest.raises(UserError, match=r"1 parameter\(s\).*t_embedder/mlp_0/kernel \(256, 64\)"):
    build_training(dit_config(**{"mesh.shape": (1, 8, 1),
                                 "mesh.max_replicated_size": 256 * 64 - 1}))


@pytest.mark.parametrize("shape,message", [
    ((2, -1, -1), "at most one -1"),
    ((3, -1, 1), "does not divide the 8 devices"),
    ((2, 2, 1), "needs 4 devices; 8 are present"),
    ((0, 8, 1), "sizes must be >= 1"),
])
def test_bad_mesh_shapes_are_clear_errors(shape, message):
  with pytest.raises(UserError, match=message):
    sharding.make_mesh(ml_collections.ConfigDict({"axes": ("data", "fsdp", "tensor"),
                                                  "shape": shape}))


def test_dcn_axes_and_rules_for_absent_axes():
  mesh = sharding.make_mesh(ml_collections.ConfigDict(
      {"axes": ("dcn_data", "data", "fsdp"), "shape": (2, 1, -1)}))
  assert dict(mesh.shape) == {"dcn_data": 2, "data": 1, "fsdp": 4}
  config = tiny_config()
  rules = dict(sharding.logical_rules(config.mesh, mesh))
  assert rules["batch"] == ("dcn_data", "data", "fsdp")  # dcn_fsdp / tensor are absent here
  assert rules["mlp"] is None and rules["embed"] == "fsdp"
  batch = sharding.batch_sharding(mesh, tuple(rules.items()))
  assert spec(batch) == (("dcn_data", "data", "fsdp"),)
  assert sharding.data_parallel_ways(batch) == 8


def test_activation_constraints_reach_the_compiled_step():
  """Block-boundary `with_logical_constraint`s are live while the step is traced (the
  step runs under the config's rules), so they appear in the lowered program."""
  setup = build_training(dit_config(**{"mesh.shape": (2, 4, 1)}))
  with jax.set_mesh(setup.mesh):
    text = setup.jit_step().lower(setup.abstract_state, setup.batch_struct(),
                                  setup.frozen_abstract()).as_text()
  assert text.count("@Sharding") >= 2 or text.count("sharding_constraint") >= 2


def test_gradient_accumulation_equals_one_big_batch():
  """k micro-batches share the whole batch's (t, ε) draws: with no label dropout one
  accumulated update equals the k = 1 update."""
  config = dit_config(**{"model.class_dropout_prob": 0.0, "sample.guidance_scale": 1.0})
  batches = fixed_batches(config, 2)
  one = jax.devices()[:1]
  base_losses, base_params, _ = train_steps(config, batches, (1, 1, 1), one)
  config.optim.grad_accum_steps = 2
  losses, params, _ = train_steps(config, batches, (1, 1, 1), one)
  assert max_relative_difference(losses, base_losses) <= 1e-6
  assert max_relative_difference(params, base_params) <= 1e-5
  config.optim.grad_accum_steps = 3  # 16 rows do not split into 3 micro-batches
  with pytest.raises(UserError, match="multiple of optim.grad_accum_steps"):
    build_training(config)


def test_nan_policy_skip_keeps_the_state_and_counts_the_step():
  config = tiny_config(**{"optim.nan_policy": "skip", "mesh.shape": (1, 1, 1)})
  setup = build_training(config, devices=jax.devices()[:1])
  state = setup.init_state()
  step = jax.jit(setup.step_fn)
  good, = fixed_batches(config, 1)
  bad = dict(good, image=good["image"].astype(np.float32))
  bad["image"][0, 0, 0, 0] = np.nan
  with jax.set_mesh(setup.mesh):
    after_bad, metrics = step(state, sharding.put_batch(bad, setup.batch_sharding), {})
    assert float(metrics["skipped"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
    assert int(after_bad.step) == 1
    for a, b in zip(jax.tree_util.tree_leaves((after_bad.params, after_bad.opt_state,
                                               after_bad.ema_params)),
                    jax.tree_util.tree_leaves((state.params, state.opt_state,
                                               state.ema_params))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    after_good = after_bad
    for _ in range(2):  # optax's schedule counts applied updates: its first lr is 0
      after_good, metrics = step(after_good, sharding.put_batch(good, setup.batch_sharding), {})
      assert float(metrics["skipped"]) == 0.0
    assert max_relative_difference(after_good.params, state.params) > 1e-4


def test_nan_stop_names_the_first_bad_step_and_metric():
  from ldm_jax.train import check_finite
  fine = {"loss": np.float32(0.5), "grad_norm": np.float32(1.0)}
  check_finite([fine, fine], 11)
  with pytest.raises(UserError, match=r"diverged at step 13: grad_norm = inf"):
    check_finite([fine, fine, dict(fine, grad_norm=np.float32(np.inf)),
                  dict(fine, loss=np.float32(np.nan))], 11)


def test_unknown_nan_policy_is_a_clear_error():
  with pytest.raises(UserError, match=r"unknown optim.nan_policy 'ignore'; valid: \['stop', 'skip'\]"):
    build_training(tiny_config(**{"optim.nan_policy": "ignore"}))


def test_accumulated_step_under_fsdp_mesh_matches_too():
  config = tiny_config(**{"model.class_dropout_prob": 0.0, "sample.guidance_scale": 1.0,
                          "optim.grad_accum_steps": 2})
  batches = fixed_batches(config, 2)
  ref_losses, ref_params, _ = train_steps(config, batches, (1, 1, 1), jax.devices()[:1])
  losses, params, _ = train_steps(config, batches, (2, 4, 1))
  assert max_relative_difference(losses, ref_losses) <= 1e-5
  assert max_relative_difference(params, ref_params) <= 1e-5
