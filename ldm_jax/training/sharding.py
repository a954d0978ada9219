"""Device mesh and logical-axis rules from `config.mesh`; shardings for the state
and the batch. Parameters are born sharded: eval_shape -> shardings -> jit(init)."""

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ldm_jax.errors import check


def make_mesh(mesh_config) -> jax.sharding.Mesh:
  """A mesh with Auto axis types; one size may be -1 (all remaining devices)."""
  names = tuple(mesh_config.axes)
  shape = list(mesh_config.shape)
  check(len(names) == len(shape), f"mesh.axes {names} and mesh.shape {shape} differ in length")
  devices = jax.device_count()
  if -1 in shape:
    check(shape.count(-1) == 1, f"mesh.shape {shape} may contain at most one -1")
    known = math.prod(s for s in shape if s != -1)
    check(devices % known == 0, f"mesh.shape {shape} does not divide {devices} devices")
    shape[shape.index(-1)] = devices // known
  check(math.prod(shape) == devices,
        f"mesh.shape {tuple(shape)} needs {math.prod(shape)} devices; {devices} are present")
  return jax.make_mesh(tuple(shape), names,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def logical_rules(mesh_config) -> tuple:
  return tuple((name, axis if axis else None) for name, axis in mesh_config.rules)


def batch_sharding(mesh) -> NamedSharding:
  """Batch dimension split over every data-parallel axis present in the mesh."""
  data_axes = tuple(a for a in mesh.axis_names if a in ("data", "fsdp") or a.startswith("dcn"))
  return NamedSharding(mesh, P(data_axes))


def check_batch_divisible(global_batch: int, sharding: NamedSharding) -> None:
  """The global batch must split evenly over the data-parallel devices."""
  spec = sharding.spec[0] or ()
  axes = spec if isinstance(spec, tuple) else (spec,)
  ways = math.prod(sharding.mesh.shape[a] for a in axes)
  check(global_batch % ways == 0,
        f"data.batch_size={global_batch} does not split over the {ways} data-parallel "
        f"devices of mesh axes {axes}; use a multiple of {ways}")


def shardings_from_boxed(boxed_tree, mesh, rules):
  """NamedShardings for a tree of (abstract) boxed variables with logical names."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put_batch(batch: dict, sharding: NamedSharding) -> dict:
  """This process's numpy batch -> global jax arrays sharded along the batch."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
