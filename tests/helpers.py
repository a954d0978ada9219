"""Helpers shared by the tests: configs, running the CLI, reading event files."""

import os
import struct
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.py")


def tiny_config(**overrides):
  """The quickstart's `tiny` preset with dotted-key overrides."""
  sys.path.insert(0, REPO)
  from configs import quickstart
  config = quickstart.get_config("tiny")
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


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


def load_config(relative_path: str, preset: str = ""):
  """`get_config(preset)` of a config file given relative to the repository root."""
  import importlib.util
  path = os.path.join(REPO, relative_path)
  spec = importlib.util.spec_from_file_location(
      "_cfg_" + os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset or None)
