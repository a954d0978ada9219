"""Shared test setup: 8 CPU devices, offline hub, persistent compilation cache, absl
flags parsed.

Every test process sees 8 host devices (`--xla_force_host_platform_device_count=8`), as
ARCHITECTURE.md asks: the default mesh (-1, 1, 1) then trains data-parallel over 8
devices in every training test, and the mesh-equivalence tests build (8,1,1), (2,4,1),
(1,4,2) and (1,8,1) meshes. Subprocesses inherit the flag through the environment.
"""

import os

DEVICES = 8
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count={DEVICES}".strip()

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
from absl import flags  # noqa: E402

_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "ldm_jax", "jax_cache_tests")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# Grain and other absl users read flags; outside absl.app.run they must be marked parsed.
flags.FLAGS.mark_as_parsed()
