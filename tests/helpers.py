"""Helpers shared by the tests: configs, running the CLI, reading event files."""

import os
import struct
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.py")


def tiny_config(**overrides):
  """The quickstart's `tiny` preset with dotted-key overrides."""
  return load_config("configs/quickstart.py", "tiny", **overrides)


def run_cli(*args, timeout=600):
  """Runs `python -m ldm_jax.main ARGS`; returns CompletedProcess (text)."""
  env = dict(os.environ, HF_HUB_OFFLINE="1")
  cache = os.path.join(os.path.expanduser("~"), ".cache", "ldm_jax", "jax_cache_tests")
  return subprocess.run([sys.executable, "-m", "ldm_jax.main", f"--compilation_cache={cache}",
                         *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def read_events(logdir):
  """All tensorboard Event protos under `logdir` (TFRecord framing, no TF needed)."""
  from tensorboardX.proto import event_pb2
  events = []
  for root, _, files in os.walk(logdir):
    for name in sorted(files):
      if "tfevents" not in name:
        continue
      with open(os.path.join(root, name), "rb") as f:
        data = f.read()
      offset = 0
      while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        payload = data[offset + 12:offset + 12 + length]
        offset += 12 + length + 4
        event = event_pb2.Event()
        event.ParseFromString(payload)
        events.append(event)
  return events


def tree_snapshot(path):
  """{relative path: (size, mtime_ns, bytes hash)} of every file under `path`."""
  import hashlib
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
      stat = os.stat(full)
      out[os.path.relpath(full, path)] = (stat.st_size, stat.st_mtime_ns, digest)
  return out


def load_config(relative_path: str, preset: str = "", **overrides):
  """`get_config(preset)` of a config file given relative to the repository root, with
  dotted-key overrides ("optim.learning_rate"=...)."""
  from ldm_jax.run_config import load_sibling_config, override
  config = load_sibling_config(os.path.join(REPO, relative_path),
                               os.path.basename(relative_path), preset or None)
  return override(config, **overrides)
