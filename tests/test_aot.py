"""Ahead-of-time compilation (`ldm_jax/aot.py`): the CPU fallback end to end on the tiny
DiT preset, the figures it prints, the "does not fit" error, and the errors for an
unknown topology and a missing libtpu; with libtpu installed (.ci/run's second venv,
`pip install -e .[aot]`) a real TPU compile and the TPU compiler's out-of-memory error."""

import json
import math
import os
import re
import subprocess
import sys

import pytest

from ldm_jax import aot
from ldm_jax.errors import UserError
from tests.helpers import REPO

TINY = "--config=configs/dit_imagenet256.py:tiny"
# DiT-tiny/2 (depth 2, width 64, 4 heads) on 32×32×4 latents, 1000 classes + the null
# class, learned Σ: x_embedder 1,088 + t_embedder 20,608 + y_embedder 64,064
# + 2 blocks × 74,688 + final layer 10,400 = 245,536.
TINY_PARAMS = 245_536


def _run_aot(*args, timeout=300):
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # aot.py asks for the topology's device count itself
  return subprocess.run([sys.executable, "-m", "ldm_jax.aot", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _tiny_matmul_flops(batch: int) -> float:
  """Matmul FLOPs of one DiT-tiny/2 training step (forward + 2× backward)."""
  tokens, width, depth, mlp = 256, 64, 2, 256
  per_block = tokens * (2 * width * 3 * width + 2 * width * width + 2 * 2 * width * mlp
                        + 2 * 2 * tokens * width)   # qkv, proj, MLP, q·k and p·v
  final = tokens * 2 * width * (2 * 2 * 8)          # to p² · 8 output channels
  embed = tokens * 2 * (2 * 2 * 4) * width          # patchify
  return 3 * batch * (depth * per_block + final + embed)


@pytest.fixture(scope="module")
def cpu_figures(tmp_path_factory):
  out = tmp_path_factory.mktemp("aot") / "figures.json"
  result = _run_aot(TINY, "--topology=v5p-8", "--platform=cpu", f"--json={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout, json.loads(out.read_text())


def test_cpu_fallback_prints_labelled_figures(cpu_figures):
  stdout, _ = cpu_figures
  assert "CPU compiler: ROUGH figures" in stdout
  for needle in ("v5p-8", "data=4 x fsdp=1 x tensor=1", f"{TINY_PARAMS:,} parameters",
                 "8 global, 2 per data-parallel shard", "arguments", "temporaries",
                 "generated code", "of 95.00 GiB HBM", "FLOPs/step", "compile"):
    assert needle in stdout, f"{needle!r} not in\n{stdout}"


def test_cpu_fallback_figures(cpu_figures):
  _, figures = cpu_figures
  assert figures["num_devices"] == 4 and figures["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  assert figures["params"] == TINY_PARAMS
  assert figures["global_batch"] == 8 and figures["fits"] is True
  memory = figures["memory"]
  # Arguments hold the replicated state (params, Adam μ and ν, EMA: 4 float32 copies)
  # plus this device's quarter of the batch.
  state_bytes = 4 * 4 * TINY_PARAMS
  assert state_bytes <= memory["arguments"] <= state_bytes * 1.05 + 64 * 1024
  assert memory["total"] >= memory["arguments"] + memory["temporaries"] - memory["aliased"]
  assert figures["hbm_bytes"] == 95 * aot.GIB
  # Per-device FLOPs: the partitioned program, a quarter of the global step; at least
  # the matmuls of forward + backward, and not wildly more.
  expected = _tiny_matmul_flops(batch=2)
  assert expected <= figures["flops_per_device"] <= 2.0 * expected, (
      figures["flops_per_device"], expected)
  assert figures["flops_total"] == pytest.approx(4 * figures["flops_per_device"])


def test_does_not_fit_is_an_error_with_the_figures():
  result = _run_aot(TINY, "--topology=v5p-8", "--platform=cpu", "--hbm_gib=0.001",
                    "--config.mesh.shape=(1,4,1)")
  assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert "data=1 x fsdp=4 x tensor=1" in result.stdout    # the figures come first
  error = result.stderr.strip().splitlines()[-1]
  match = re.match(r"error: does not fit: v5p-8 needs ([\d.]+) GiB \(([\d,]+) bytes\) per "
                   r"device but has 0\.00 GiB \(1,073,741 bytes\)", error)
  assert match, error
  assert int(match.group(2).replace(",", "")) > 1_073_741
  for suggestion in ("fsdp", "remat", "batch_size"):
    assert suggestion in error


def test_unknown_topology_lists_valid_ones():
  result = _run_aot(TINY, "--topology=v9-8")
  assert result.returncode == 2
  assert "unknown --topology='v9-8'; valid:" in result.stderr
  assert "'v5p-8'" in result.stderr and "'v5e-256'" in result.stderr
  with pytest.raises(UserError, match="v5p-8"):
    aot.topology("v5p8")


def test_missing_libtpu_tells_how_to_install(monkeypatch):
  monkeypatch.setattr(aot, "libtpu_installed", lambda: False)
  with pytest.raises(UserError, match=re.escape("pip install -e .[aot]")):
    aot.tpu_devices("v5p-8")
  with pytest.raises(UserError, match="--platform=cpu"):
    aot.tpu_devices("v5p-8")


@pytest.mark.parametrize("name", sorted(aot.TOPOLOGIES))
def test_topology_table_is_consistent(name):
  """Device counts follow from the chip grid; v4 / v5p names count TensorCores (2 per
  megacore chip), v5e / v6e names count chips."""
  spec = aot.TOPOLOGIES[name]
  generation, grid = spec.topology_name.split(":")
  chips = math.prod(int(n) for n in grid.split("x"))
  assert spec.num_devices == chips
  cores_in_name = int(name.split("-")[1])
  assert cores_in_name == (2 * chips if spec.chip_config == "megacore" else chips)
  assert spec.hbm_gib == {"v4": 32, "v5": 95, "v5e": 16, "v6e": 32}[generation]


def assert_libtpu_missing_error(result):
  """Without libtpu (the test venv) a TPU target is a clear error saying how to get it."""
  assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
  assert "error: libtpu is not installed" in result.stderr
  assert "pip install -e .[aot]" in result.stderr and "Traceback" not in result.stderr


# The two tests below compile for a real TPU target where libtpu is installed (.ci/run
# runs this file a second time in a venv with `pip install -e .[aot]`); in the main test
# venv, without libtpu, the same command must fail with the install hint.


def test_tpu_compile_of_the_tiny_preset(tmp_path):
  out = tmp_path / "tpu.json"
  result = _run_aot(TINY, "--topology=v5p-8", f"--json={out}")
  if not aot.libtpu_installed():
    assert_libtpu_missing_error(result)
    assert not out.exists()
    return
  assert result.returncode == 0, result.stderr[-3000:]
  figures = json.loads(out.read_text())
  assert "TPU compiler" in result.stdout
  assert figures["device_kind"].startswith("TPU v5") and figures["num_devices"] == 4
  assert figures["params"] == TINY_PARAMS and figures["flops_per_device"] > 0
  # The attention traced for the target: the Pallas TPU flash kernel lowers and compiles.
  pallas = _run_aot(TINY, "--topology=v5p-8", "--config.model.attention=pallas")
  assert pallas.returncode == 0, pallas.stderr[-3000:]


def test_tpu_compiler_out_of_memory_is_a_clear_error():
  """Far past HBM the TPU compiler itself refuses; that is the same one-line error."""
  result = _run_aot(TINY, "--topology=v5e-4", "--config.data.batch_size=262144")
  if not aot.libtpu_installed():
    assert_libtpu_missing_error(result)
    return
  assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  error = result.stderr.strip().splitlines()[-1]
  assert error.startswith("error: does not fit: v5e-4"), error
  assert "exceeds available HBM" in error and "batch_size" in error
