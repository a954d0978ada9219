"""Ahead-of-time compile of the training step for a named TPU topology, on any machine.

  python -m ldm_jax.aot --config=configs/dit_imagenet256.py --topology=v5p-8 \
      [--config.mesh.shape="(1,4,1)"] [--num_slices=2] [--json=OUT.json]
  python -m ldm_jax.aot --config=configs/dit_imagenet256.py:tiny --topology=v5p-8 --platform=cpu

libtpu's topology description (`pip install -e .[aot]`) gives the devices of a TPU
slice with no TPU present, as MaxText's train_compile.py does; the step that
`build_training` builds (the one `train.py` runs) is lowered on the abstract state and
batch and compiled by the TPU compiler. Printed per device: arguments, outputs,
temporaries, generated code and the total against the chip's HBM; FLOPs per step.
A configuration that does not fit ends with `error: ...` and exit status 2.

`--platform=cpu` compiles the same mesh over forced host devices with the CPU compiler
instead (no libtpu needed): rough figures from a different compiler, labelled so.
"""

import dataclasses
import importlib.util
import json
import math
import os
import sys
import time

from absl import app, flags

from ldm_jax.errors import UserError, check
# --config (with its override and error handling) is the training entry point's own.
from ldm_jax.main import _load_config, _parse_flags

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Topology:
  """One TPU slice: libtpu's `get_topology_desc` arguments and the chip's memory."""
  topology_name: str          # "<generation>:<chip grid>"
  chip_config: str            # megacore: one device per chip (v4, v5p); default: v5e, v6e
  chips_per_host_bounds: tuple
  num_devices: int            # devices (= chips) per slice
  hbm_gib: float              # HBM per device
  accelerator_type: str       # Cloud TPU's name (TPU_ACCELERATOR_TYPE)


# Grids and host bounds as MaxText's accelerator_to_spec_map.py. HBM per chip from the
# Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v4, /v5p, /v5e, /v6e):
# v4 32 GiB, v5p 95 GiB, v5e 16 GiB, v6e (Trillium) 32 GiB. v4 / v5p names count
# TensorCores (2 per chip, fused into one megacore device); v5e / v6e names count chips.
_V4, _V5P, _V5E, _V6E = 32.0, 95.0, 16.0, 32.0
TOPOLOGIES = {
    "v4-8": Topology("v4:2x2x1", "megacore", (2, 2, 1), 4, _V4, "v4-8"),
    "v4-16": Topology("v4:2x2x2", "megacore", (2, 2, 1), 8, _V4, "v4-16"),
    "v4-32": Topology("v4:2x2x4", "megacore", (2, 2, 1), 16, _V4, "v4-32"),
    "v4-128": Topology("v4:4x4x4", "megacore", (2, 2, 1), 64, _V4, "v4-128"),
    "v5p-8": Topology("v5:2x2x1", "megacore", (2, 2, 1), 4, _V5P, "v5p-8"),
    "v5p-16": Topology("v5:2x2x2", "megacore", (2, 2, 1), 8, _V5P, "v5p-16"),
    "v5p-32": Topology("v5:2x2x4", "megacore", (2, 2, 1), 16, _V5P, "v5p-32"),
    "v5p-128": Topology("v5:4x4x4", "megacore", (2, 2, 1), 64, _V5P, "v5p-128"),
    "v5p-256": Topology("v5:4x4x8", "megacore", (2, 2, 1), 128, _V5P, "v5p-256"),
    "v5e-4": Topology("v5e:2x2", "default", (2, 2, 1), 4, _V5E, "v5litepod-4"),
    "v5e-8": Topology("v5e:2x4", "default", (2, 2, 1), 8, _V5E, "v5litepod-8"),
    "v5e-16": Topology("v5e:4x4", "default", (2, 2, 1), 16, _V5E, "v5litepod-16"),
    "v5e-256": Topology("v5e:16x16", "default", (2, 2, 1), 256, _V5E, "v5litepod-256"),
    "v6e-4": Topology("v6e:2x2", "default", (2, 2, 1), 4, _V6E, "v6e-4"),
    "v6e-8": Topology("v6e:2x4", "default", (2, 2, 1), 8, _V6E, "v6e-8"),
    "v6e-256": Topology("v6e:16x16", "default", (2, 2, 1), 256, _V6E, "v6e-256"),
}
PLATFORMS = ("tpu", "cpu")

_TOPOLOGY = flags.DEFINE_string("topology", None, f"TPU slice: one of {list(TOPOLOGIES)}.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices (multislice over DCN; mesh axes "
                                   "named dcn_* span them).")
_PLATFORM = flags.DEFINE_string("platform", "tpu", "tpu: libtpu's compiler; cpu: the local "
                                "CPU compiler over as many forced host devices (rough).")
_HBM_GIB = flags.DEFINE_float("hbm_gib", 0.0, "Memory per device to check against, GiB "
                              "(0 = the topology's HBM).")
_JSON = flags.DEFINE_string("json", "", "Also write the figures to this JSON file.")


def topology(name: str) -> Topology:
  check(name in TOPOLOGIES, f"unknown --topology={name!r}; valid: {list(TOPOLOGIES)}")
  return TOPOLOGIES[name]


def libtpu_installed() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def tpu_devices(name: str, num_slices: int = 1) -> list:
  """The devices of `num_slices` slices of TPU topology `name`, from libtpu (no TPU needed)."""
  spec = topology(name)
  check(num_slices >= 1, f"--num_slices must be >= 1, got {num_slices}")
  check(libtpu_installed(),
        "libtpu is not installed, so TPU topologies cannot be compiled for: "
        "pip install -e .[aot] (jax[tpu], in its own virtual environment), "
        "or pass --platform=cpu for rough figures from the CPU compiler")
  # libtpu looks for a TPU VM's metadata unless told not to (harmless warnings only).
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", spec.accelerator_type)
  # Only the compiler is used (never a chip), so compiles may run side by side and next
  # to a job that holds a local TPU; otherwise libtpu's lockfile refuses the second one.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  description = topologies.get_topology_desc(
      platform="tpu", topology_name=spec.topology_name, chip_config_name=spec.chip_config,
      chips_per_host_bounds=spec.chips_per_host_bounds, num_slices=num_slices)
  devices = list(description.devices)
  if len(devices) != spec.num_devices * num_slices:  # the table is wrong: a bug, not the user's
    raise RuntimeError(f"{name}: libtpu gave {len(devices)} devices, the table says "
                       f"{spec.num_devices * num_slices}")
  return devices


def cpu_devices(count: int) -> list:
  """`count` CPU devices (forced host devices when the backend starts here)."""
  import jax
  try:
    jax.config.update("jax_platforms", "cpu")  # never touch a local accelerator
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:  # the backends already started (in-process callers)
    pass
  devices = jax.devices("cpu")
  check(len(devices) >= count,
        f"--platform=cpu needs {count} CPU devices but this process has {len(devices)}; run "
        f"in a fresh process (or set XLA_FLAGS=--xla_force_host_platform_device_count={count})")
  return devices[:count]


def memory_figures(compiled) -> dict:
  """Per-device bytes from the compiler's memory analysis.

  `total` = arguments + outputs − aliased (donated state) + temporaries + code, or the
  compiler's peak when larger; where the compiler leaves `temp_size_in_bytes` 0 (v4,
  v5e) the temporaries are what the peak holds beyond arguments and outputs.
  """
  stats = compiled.memory_analysis()
  arguments, outputs = stats.argument_size_in_bytes, stats.output_size_in_bytes
  aliased, code = stats.alias_size_in_bytes, stats.generated_code_size_in_bytes
  temporaries = stats.temp_size_in_bytes
  peak = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)
  live_io = arguments + outputs - aliased
  if temporaries == 0 and peak > live_io:
    temporaries = peak - live_io
  total = max(live_io + temporaries + code, peak)
  return {"arguments": arguments, "outputs": outputs, "aliased": aliased,
          "temporaries": temporaries, "generated_code": code, "peak": peak, "total": total}


def step_flops(compiled) -> float | None:
  """FLOPs of one step on one device (the partitioned program), if the backend says."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def compile_step(config, devices) -> dict:
  """Lowers and compiles `build_training(config, devices).jit_step()` on the abstract
  state and batch; returns the figures (bytes, FLOPs, seconds)."""
  import jax
  from ldm_jax.models.registry import count_params
  from ldm_jax.training import sharding
  from ldm_jax.training.setup import build_training

  try:
    sharding.make_mesh(config.mesh, devices)
  except UserError:
    raise
  except (ValueError, NotImplementedError, AssertionError) as e:
    raise UserError(f"mesh.shape {tuple(config.mesh.shape)} (axes {tuple(config.mesh.axes)}) "
                    f"cannot be laid out on these {len(devices)} devices: "
                    f"{' '.join(str(e).split())[:400]}; each mesh axis must be a product of "
                    f"the slice's physical axes") from e
  from ldm_jax.models.attention import target_platform
  # Trace attention for the target (the TPU kernels on a TPU), not for this CPU.
  with target_platform(devices[0].platform):
    setup = build_training(config, devices=devices, abstract_data=True)
    start = time.perf_counter()
    with jax.set_mesh(setup.mesh):
      lowered = setup.jit_step().lower(setup.abstract_state, setup.batch_struct(),
                                        setup.frozen_abstract())
  lower_seconds = time.perf_counter() - start
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 - the compiler's out-of-memory is the user's to fix
    text = str(e)
    if "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text:
      raise _DoesNotFit(" ".join(text.split())[:1200].rstrip(". ")) from e
    raise
  compile_seconds = time.perf_counter() - start
  flops = step_flops(compiled)
  return {
      "mesh": dict(setup.mesh.shape),
      "num_devices": len(devices),
      "device_kind": devices[0].device_kind,
      "params": count_params(setup.abstract_state.params),
      "global_batch": int(config.data.batch_size),
      "model": f"{config.model.name} {config.model.get('variant', '')}".strip(),
      "memory": memory_figures(compiled),
      "flops_per_device": flops,
      "flops_total": None if flops is None else flops * len(devices),
      "lower_seconds": round(lower_seconds, 2),
      "compile_seconds": round(compile_seconds, 2),
  }


class _DoesNotFit(Exception):
  """The TPU compiler itself refused: the program needs more HBM than the chip has."""


def _gib(n: float) -> str:
  """Bytes as GiB, or MiB below one GiB (tiny configurations)."""
  if n >= GIB or n == 0:
    return f"{n / GIB:8.2f} GiB"
  return f"{n / (1 << 20):8.2f} MiB"


def _flop(n: float) -> str:
  return f"{n / 1e12:.2f} TFLOP" if n >= 1e11 else f"{n / 1e9:.3f} GFLOP"


def format_report(figures: dict) -> str:
  mem, hbm = figures["memory"], figures["hbm_bytes"]
  mesh = " x ".join(f"{axis}={size}" for axis, size in figures["mesh"].items())
  lines = [
      f"target     {figures['target']}",
      f"mesh       {mesh}  ({figures['num_devices']} devices)",
      f"model      {figures['model']}: {figures['params']:,} parameters",
      f"batch      {figures['global_batch']} global, "
      f"{figures['global_batch'] / figures['data_parallel']:g} per data-parallel shard",
      "memory per device:",
      f"  arguments       {_gib(mem['arguments'])}   (state + batch)",
      f"  outputs         {_gib(mem['outputs'])}   ({_gib(mem['aliased']).strip()} aliased to "
      f"the donated state)",
      f"  temporaries     {_gib(mem['temporaries'])}",
      f"  generated code  {_gib(mem['generated_code'])}",
      *([f"  compiler's peak {_gib(mem['peak'])}"] if mem["peak"] else []),
      f"  total           {_gib(mem['total'])}   of {_gib(hbm).strip()} HBM "
      f"({100 * mem['total'] / hbm:.1f} %)",
  ]
  if figures["flops_per_device"] is None:
    lines.append("FLOPs/step  (the compiler gives no cost analysis)")
  else:
    lines.append(f"FLOPs/step {_flop(figures['flops_per_device'])} per device, "
                 f"{_flop(figures['flops_total'])} in total")
  lines.append(f"compile    {figures['compile_seconds']:.1f} s "
               f"(lowering {figures['lower_seconds']:.1f} s)")
  return "\n".join(lines)


def _data_parallel(mesh: dict) -> int:
  return math.prod(size for axis, size in mesh.items()
                   if axis in ("data", "fsdp") or axis.startswith("dcn"))


def _suggestions(config) -> str:
  """What to change when the step does not fit, for the options this config has."""
  tips = ["shard the state over more devices (a larger fsdp axis in --config.mesh.shape, "
          "or a larger topology)"]
  model = config.model
  if model.get("remat", None) == "none":
    tips.append("recompute activations in the backward pass (--config.model.remat=full)")
  if model.get("dtype", None) == "float32":
    tips.append("compute in bfloat16 (--config.model.dtype=bfloat16)")
  tips.append(f"use a smaller --config.data.batch_size (now {config.data.batch_size})")
  return "; ".join(tips)


def run(config, topology_name: str, platform: str = "tpu", num_slices: int = 1,
        hbm_gib: float = 0.0) -> dict:
  """Compiles the step of `config` for `topology_name` and returns the figures; raises
  UserError (after printing the figures) when a device needs more than its HBM."""
  check(platform in PLATFORMS, f"unknown --platform={platform!r}; valid: {list(PLATFORMS)}")
  spec = topology(topology_name)
  check(hbm_gib >= 0, f"--hbm_gib must be >= 0, got {hbm_gib}")
  hbm_bytes = int((hbm_gib or spec.hbm_gib) * GIB)
  slices = f" x {num_slices} slices" if num_slices > 1 else ""
  if platform == "tpu":
    import jax
    # Compile only: keep this process off any local accelerator (libtpu's included).
    try:
      jax.config.update("jax_platforms", "cpu")
    except RuntimeError:
      pass
    devices = tpu_devices(topology_name, num_slices)
    target = f"{topology_name}{slices} ({spec.topology_name}, {spec.chip_config}); TPU compiler"
  else:
    devices = cpu_devices(spec.num_devices * num_slices)
    target = (f"{topology_name}{slices} as {len(devices)} CPU devices; CPU compiler: ROUGH "
              f"figures, not the TPU compiler's (TPU layouts, fusion and memory differ)")
  try:
    figures = compile_step(config, devices)
  except _DoesNotFit as e:
    raise UserError(f"does not fit: {topology_name} (mesh.shape {tuple(config.mesh.shape)}, "
                    f"global batch {config.data.batch_size}, {hbm_bytes / GIB:g} GiB HBM per "
                    f"device): the TPU compiler ran out of memory: {e}. "
                    f"Try: {_suggestions(config)}") from e
  figures.update(target=target, topology=topology_name, platform=platform,
                 num_slices=num_slices, hbm_bytes=hbm_bytes,
                 data_parallel=_data_parallel(figures["mesh"]),
                 fits=figures["memory"]["total"] <= hbm_bytes)
  return figures


def _write_json(path: str, figures: dict) -> None:
  try:
    with open(path, "w") as f:
      json.dump(figures, f, indent=2)
      f.write("\n")
  except OSError as e:
    raise UserError(f"--json={path!r} cannot be written: {e.strerror}") from e


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    check(_TOPOLOGY.value is not None,
          f"--topology is required; valid: {list(TOPOLOGIES)}")
    topology(_TOPOLOGY.value)
    config = _load_config()
    figures = run(config, _TOPOLOGY.value, _PLATFORM.value, _NUM_SLICES.value,
                  _HBM_GIB.value)
    print(format_report(figures))
    if _JSON.value:
      _write_json(_JSON.value, figures)
    if not figures["fits"]:
      need, have = figures["memory"]["total"], figures["hbm_bytes"]
      raise UserError(
          f"does not fit: {_TOPOLOGY.value} needs {need / GIB:.2f} GiB ({need:,} bytes) per "
          f"device but has {have / GIB:.2f} GiB ({have:,} bytes) "
          f"(mesh {figures['mesh']}, global batch {figures['global_batch']}). "
          f"Try: {_suggestions(config)}")
  except UserError as e:
    sys.stdout.flush()
    print(f"error: {e}", file=sys.stderr)
    sys.stderr.flush()
    os._exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
