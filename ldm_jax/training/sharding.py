"""Device mesh and logical-axis rules from `config.mesh`; shardings for the state
and the batch. Parameters are born sharded: eval_shape -> shardings -> jit(init)."""

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ldm_jax.errors import UserError, check


def resolve_shape(mesh_config, num_devices: int) -> tuple:
  """`mesh.shape` with its one -1 filled in for `num_devices` devices."""
  names = tuple(mesh_config.axes)
  shape = list(mesh_config.shape)
  check(len(names) == len(shape), f"mesh.axes {names} and mesh.shape {tuple(shape)} differ in length")
  check(len(set(names)) == len(names), f"mesh.axes {names} repeats an axis name")
  check(all(s == -1 or s >= 1 for s in shape),
        f"mesh.shape {tuple(shape)}: sizes must be >= 1, or -1 (once) for 'all the rest'")
  if -1 in shape:
    check(shape.count(-1) == 1, f"mesh.shape {tuple(shape)} may contain at most one -1")
    known = math.prod(s for s in shape if s != -1)
    check(num_devices % known == 0,
          f"mesh.shape {tuple(shape)} does not divide the {num_devices} devices present")
    shape[shape.index(-1)] = num_devices // known
  check(math.prod(shape) == num_devices,
        f"mesh.shape {tuple(shape)} needs {math.prod(shape)} devices; {num_devices} are present")
  return tuple(shape)


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  """The mesh of `config.mesh` over `devices` (default: all), with Auto axis types.

  One size may be -1 (all remaining devices). Axes named `dcn_*` span slices /
  hosts (data-centre network): on a multi-slice TPU or multi-process run they are
  laid out across slices (or processes), the other axes within one; on a single
  slice / process they are ordinary axes.
  """
  # Process-major order: along the batch axes, process p's devices come p-th, so each
  # process's contiguous slice of the global batch (data/pipeline.py) lands on them.
  devices = sorted(jax.devices() if devices is None else devices,
                   key=lambda d: (d.process_index, d.id))
  names = tuple(mesh_config.axes)
  shape = resolve_shape(mesh_config, len(devices))
  axis_types = (jax.sharding.AxisType.Auto,) * len(names)
  dcn = [i for i, n in enumerate(names) if n.startswith("dcn")]
  granules, by_slice = _granules(devices)
  dcn_ways = math.prod(shape[i] for i in dcn)
  if dcn and granules > 1 and dcn_ways > 1:
    check(dcn_ways == granules,
          f"mesh axes {[names[i] for i in dcn]} span {dcn_ways} slices/processes but the run "
          f"has {granules}; make the dcn_* sizes multiply to {granules}")
    from jax.experimental import mesh_utils
    ici = [1 if i in dcn else s for i, s in enumerate(shape)]
    dcn_shape = [s if i in dcn else 1 for i, s in enumerate(shape)]
    array = mesh_utils.create_hybrid_device_mesh(ici, dcn_shape, devices,
                                                 process_is_granule=not by_slice)
    return jax.sharding.Mesh(array, names, axis_types=axis_types)
  return jax.make_mesh(shape, names, axis_types=axis_types, devices=devices)


def _granules(devices) -> tuple[int, bool]:
  """(number of granules, whether they are TPU slices): the slices the devices span
  when there are several, else the processes."""
  slices = {getattr(d, "slice_index", None) for d in devices}
  if len(slices) > 1:
    return len(slices), True
  return len({d.process_index for d in devices}), False


def logical_rules(mesh_config, mesh=None) -> tuple:
  """The (logical axis, mesh axes) rules of `config.mesh.rules`; with `mesh`, mesh
  axes that mesh lacks are dropped (one rule set serves meshes with and without
  `dcn_*` axes)."""
  rules = []
  for name, axes in mesh_config.rules:
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    if mesh is not None:
      axes = tuple(a for a in axes if a in mesh.axis_names)
    axes = tuple(a for a in axes if a)
    rules.append((name, axes[0] if len(axes) == 1 else (axes or None)))
  return tuple(rules)


def batch_sharding(mesh, rules=None) -> NamedSharding:
  """The batch dimension split over the mesh axes of the `batch` rule (default: every
  data-parallel axis: data, fsdp, dcn_*), taken in the mesh's order so that process
  p's devices hold the p-th contiguous slice of a global batch."""
  rule = dict(rules or ()).get("batch", "__default__")
  if rule == "__default__":
    wanted = {a for a in mesh.axis_names if a in ("data", "fsdp") or a.startswith("dcn")}
  else:
    wanted = {rule} if isinstance(rule, str) else set(rule or ())
  data_axes = tuple(a for a in mesh.axis_names if a in wanted)
  return NamedSharding(mesh, P(data_axes or None))


def data_parallel_ways(sharding: NamedSharding) -> int:
  """Into how many pieces `sharding` splits the batch dimension."""
  spec = sharding.spec[0] if len(sharding.spec) else None
  axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
  return math.prod(sharding.mesh.shape[a] for a in axes)


def check_batch_divisible(global_batch: int, sharding: NamedSharding) -> None:
  """The global batch must split evenly over the data-parallel devices."""
  ways = data_parallel_ways(sharding)
  check(global_batch % ways == 0,
        f"data.batch_size={global_batch} does not split over the {ways} data-parallel "
        f"devices of the mesh {dict(sharding.mesh.shape)}; use a multiple of {ways}")


def shardings_from_boxed(boxed_tree, mesh, rules):
  """NamedShardings for a tree of (abstract) boxed variables with logical names.

  A mesh axis (or axes) that does not divide the dimension it would split is
  dropped for that parameter (e.g. a 1-channel input convolution on an 8-way fsdp
  axis): that dimension stays whole; `check_replication` catches the large ones.
  """
  specs = nn.get_partition_spec(boxed_tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  shapes = nn.unbox(boxed_tree)
  return jax.tree_util.tree_map(lambda s, x: fit_sharding(s, x.shape), shardings, shapes)


def fit_sharding(sharding: NamedSharding, shape) -> NamedSharding:
  """`sharding` with the mesh axes removed from every dimension they do not divide."""
  entries = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  fitted = []
  for size, entry in zip(shape, entries):
    axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
    kept = []
    for axis in axes:
      if size % (math.prod(sharding.mesh.shape[a] for a in kept) * sharding.mesh.shape[axis]) == 0:
        kept.append(axis)
    fitted.append(kept[0] if len(kept) == 1 else (tuple(kept) or None))
  return NamedSharding(sharding.mesh, P(*fitted))


def is_replicated(sharding: NamedSharding) -> bool:
  """True when every device holds the whole array (axes of size 1 split nothing)."""
  sizes = sharding.mesh.shape
  return all(math.prod(sizes[a] for a in ((entry,) if isinstance(entry, str) else entry or ()))
             == 1 for entry in sharding.spec)


def check_replication(params, shardings, mesh, limit: int) -> None:
  """The silent-replication trap: fails, naming them, when parameters with more than
  `limit` elements are fully replicated although the mesh has a model-sharding axis
  (fsdp / tensor, size > 1). `limit` <= 0 turns the check off."""
  sharded_axes = [a for a in mesh.axis_names
                  if (a in ("fsdp", "tensor") or a.startswith("dcn_fsdp")) and mesh.shape[a] > 1]
  if limit <= 0 or not sharded_axes:
    return
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_shardings = jax.tree_util.tree_leaves(shardings,
                                             is_leaf=lambda x: isinstance(x, NamedSharding))
  offending = [(jax.tree_util.keystr(path, simple=True, separator="/"), tuple(x.shape))
               for (path, x), s in zip(flat, flat_shardings)
               if math.prod(x.shape) > limit and is_replicated(s)]
  if offending:
    names = ", ".join(f"{n} {shape}" for n, shape in offending[:12])
    more = f" and {len(offending) - 12} more" if len(offending) > 12 else ""
    raise UserError(
        f"{len(offending)} parameter(s) larger than mesh.max_replicated_size={limit} elements "
        f"would be fully replicated on every device although the mesh shards over "
        f"{sharded_axes}: {names}{more}. Map their logical axes to a mesh axis in "
        f"mesh.rules (or one whose size divides them), or raise mesh.max_replicated_size "
        f"(0 = no check)")


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put_batch(batch: dict, sharding: NamedSharding) -> dict:
  """This process's numpy batch -> global jax arrays sharded along the batch. String
  entries (e.g. a latent cache's "caption") stay on the host: they are not inputs."""
  arrays = {k: np.asarray(v) for k, v in batch.items()}
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in arrays.items() if v.dtype.kind not in "USO"}
