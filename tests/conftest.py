"""Shared test setup: offline hub, persistent compilation cache, absl flags parsed."""

import os

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
