"""Shared helper for the mesh-equivalence tests: any model config trained a few steps
on 8 CPU devices under several meshes must match the single-device run.

  from tests.mesh_equivalence import assert_mesh_equivalence
  assert_mesh_equivalence(config)          # every later model calls this
"""

import jax
import numpy as np

from ldm_jax.training import sharding
from ldm_jax.training.setup import build_training

# (data, fsdp, tensor): pure data parallel, data x fsdp, fsdp x tensor, pure fsdp.
MESHES = ((8, 1, 1), (2, 4, 1), (1, 4, 2), (1, 8, 1))
# Adam's ε for these comparisons. With ε = 1e-8 Adam's first updates are lr·g/|g|: a
# gradient element near 0, which a different summation order changes by a large
# *relative* amount, moves its parameter by ±lr. Measured on the compact U-Net: losses
# equal to 1.8e-7 but zero-initialised conv kernels 4.5e-4 apart after 3 steps; with
# ε = 1e-3 the worst parameter is 1.1e-6 apart. The sharding is not what differs.
ADAM_EPS = 1e-3


def fixed_batches(config, steps: int, seed: int = 0) -> list[dict]:
  """`steps` deterministic global batches shaped like `config.data`'s."""
  rng = np.random.default_rng(seed)
  data = config.data
  shape = (data.batch_size, data.image_size, data.image_size, data.channels)
  return [{"image": rng.integers(0, 256, shape, dtype=np.uint8),
           "label": rng.integers(0, data.num_classes, (data.batch_size,), dtype=np.int32)}
          for _ in range(steps)]


def train_steps(config, batches, mesh_shape, devices=None):
  """Trains from the initial state on `batches` under `mesh_shape`; returns
  (losses (steps,), params as a numpy tree, the setup)."""
  config = config.copy_and_resolve_references()
  config.mesh.shape = tuple(mesh_shape)
  config.optim.eps = max(config.optim.eps, ADAM_EPS)
  if "disc_optim" in config:  # task "autoencode": the discriminator's Adam too
    config.disc_optim.eps = max(config.disc_optim.eps, ADAM_EPS)
  setup = build_training(config, devices=devices)
  state = setup.init_state()
  step = setup.jit_step()
  frozen = setup.load_frozen()
  losses = []
  with jax.set_mesh(setup.mesh):
    for batch in batches:
      state, metrics = step(state, sharding.put_batch(batch, setup.batch_sharding), frozen)
      losses.append(metrics["loss"])
  return np.asarray(jax.device_get(losses)), jax.device_get(state.params), setup


def max_relative_difference(a_tree, b_tree) -> float:
  """max over leaves of max|a - b| / max(max|b|, tiny)."""
  assert jax.tree_util.tree_structure(a_tree) == jax.tree_util.tree_structure(b_tree)
  worst = 0.0
  for a, b in zip(jax.tree_util.tree_leaves(a_tree), jax.tree_util.tree_leaves(b_tree)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    worst = max(worst, float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)))
  return worst


def assert_mesh_equivalence(config, steps: int = 3, rtol: float = 1e-5, meshes=MESHES):
  """Losses and params after `steps` steps under each mesh equal the one-device run
  within `rtol` (relative to each leaf's largest magnitude). Returns {mesh: (loss
  difference, param difference)} for reporting."""
  assert jax.device_count() >= 8, "needs 8 devices (tests/conftest.py forces them)"
  batches = fixed_batches(config, steps)
  ref_losses, ref_params, _ = train_steps(config, batches, (1, 1, 1), jax.devices()[:1])
  report = {}
  for shape in meshes:
    losses, params, setup = train_steps(config, batches, shape)
    assert dict(setup.mesh.shape) == dict(zip(config.mesh.axes, shape))
    loss_diff = max_relative_difference(losses, ref_losses)
    param_diff = max_relative_difference(params, ref_params)
    report[shape] = (loss_diff, param_diff)
    assert loss_diff <= rtol and param_diff <= rtol, (
        f"mesh {shape}: losses {losses} vs one device {ref_losses} (relative {loss_diff:.2e}); "
        f"params relative {param_diff:.2e}; tolerance {rtol}")
  return report
