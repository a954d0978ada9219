"""Joining a multi-process run (jax.distributed) from the LDM_JAX_* environment, with
bounded failure detection.

A peer's death ends the survivors inside JAX's C++ coordination client (LOG(FATAL) and
abort, exit status 134), after a stack trace that does not say what happened; JAX gives
Python no hook (its missed-heartbeat callback cannot be given a Python function). So in
multi-process runs stderr passes through a small helper process (`ldm_jax.peer_watch`),
which copies it unchanged and, when the run ended that way, adds one line saying which
process failed.
"""

import inspect
import os
import subprocess
import sys

from ldm_jax.errors import UserError

_HEARTBEAT_DEFAULT_S = 60   # JAX's own default is 100 s
_INIT_DEFAULT_S = 300


def _positive_seconds(name: str, default: float) -> int:
  """A whole number of seconds > 0 from environment variable `name` (else `default`)."""
  text = os.environ.get(name, "").strip()
  if not text:
    return int(default)
  try:
    value = float(text)
  except ValueError:
    value = float("nan")
  if not value > 0 or value == float("inf"):
    raise UserError(f"{name}={text!r} must be a number of seconds > 0 (default {default})")
  return max(1, round(value))


def _distributed_timeouts(initialize, heartbeat_s: int, init_s: int) -> dict:
  """Keyword arguments of `initialize` (jax.distributed.initialize) that bound failure
  detection to about `heartbeat_s` seconds and joining to `init_s`; only those the
  installed JAX accepts (0.10-0.12 take heartbeat_timeout_seconds; older releases took
  heartbeat intervals and a count of missed heartbeats instead)."""
  try:
    names = set(inspect.signature(initialize).parameters)
  except (TypeError, ValueError):
    names = set()
  kwargs = {}
  if "initialization_timeout" in names:
    kwargs["initialization_timeout"] = init_s
  if "heartbeat_timeout_seconds" in names:
    kwargs["heartbeat_timeout_seconds"] = heartbeat_s
  else:
    interval = max(1, heartbeat_s // 10)
    for side in ("service", "client"):
      if f"{side}_heartbeat_interval_seconds" in names:
        kwargs[f"{side}_heartbeat_interval_seconds"] = interval
      if f"{side}_max_missing_heartbeats" in names:
        kwargs[f"{side}_max_missing_heartbeats"] = max(1, -(-heartbeat_s // interval))
  return kwargs




_watcher = None


def _watch_stderr(me, num, coordinator: str, heartbeat_s: int, init_s: int, workdir: str):
  """Routes this process's stderr (fd 2, C++ logs included) through `ldm_jax.peer_watch`."""
  if os.environ.get("LDM_JAX_STDERR_WATCHER", "1") == "0":
    return
  global _watcher
  read, write = os.pipe()
  try:
    _watcher = subprocess.Popen(
        [sys.executable, "-m", "ldm_jax.peer_watch", str(os.getpid()), str(me), str(num),
         coordinator, str(heartbeat_s), str(init_s), os.path.abspath(workdir or ".")],
        stdin=read, stdout=subprocess.DEVNULL, close_fds=True,  # its stderr: the real one
        start_new_session=True)  # a Ctrl-C to the terminal's group does not reach it
  except OSError:  # no helper: the run goes on with JAX's own messages
    os.close(write)
    return
  finally:
    os.close(read)
  sys.stderr.flush()
  os.dup2(write, 2)
  os.close(write)


def initialize_distributed(jax, workdir: str = ""):
  """Multi-process runs (launch/: local, SLURM) name the coordinator through
  LDM_JAX_COORDINATOR, LDM_JAX_NUM_PROCESSES, LDM_JAX_PROCESS_ID (and optionally
  LDM_JAX_LOCAL_DEVICE_IDS); on TPU VMs LDM_JAX_DISTRIBUTED=auto (launch/tpu) lets JAX
  find the workers itself. Nothing set: one process.

  If a process dies or stops responding, the others stop within about
  LDM_JAX_HEARTBEAT_TIMEOUT seconds (default 60) with a one-line `error:` naming it;
  a process whose peers do not all join within LDM_JAX_INIT_TIMEOUT seconds (default
  300) stops the same way. (LDM_JAX_STDERR_WATCHER=0 turns off the helper process that
  writes those lines; JAX's own abort messages remain.)"""
  env = os.environ
  auto = env.get("LDM_JAX_DISTRIBUTED") == "auto"
  if not auto and not env.get("LDM_JAX_COORDINATOR"):
    return
  heartbeat_s = _positive_seconds("LDM_JAX_HEARTBEAT_TIMEOUT", _HEARTBEAT_DEFAULT_S)
  init_s = _positive_seconds("LDM_JAX_INIT_TIMEOUT", _INIT_DEFAULT_S)
  timeouts = _distributed_timeouts(jax.distributed.initialize, heartbeat_s, init_s)
  if auto:  # TPU VMs: the workers find each other
    _watch_stderr("?", "?", "the TPU coordinator", heartbeat_s, init_s, workdir)
    jax.distributed.initialize(**timeouts)
    return
  try:
    num, pid = int(env["LDM_JAX_NUM_PROCESSES"]), int(env["LDM_JAX_PROCESS_ID"])
  except (KeyError, ValueError) as e:
    raise UserError("LDM_JAX_COORDINATOR is set, so LDM_JAX_NUM_PROCESSES and "
                    "LDM_JAX_PROCESS_ID must be integers too (see launch/README.md)") from e
  if not 0 <= pid < num:
    raise UserError(f"LDM_JAX_PROCESS_ID={pid} must be in [0, {num}) "
                    f"(LDM_JAX_NUM_PROCESSES={num})")
  local = env.get("LDM_JAX_LOCAL_DEVICE_IDS")
  # Collectives between CPU processes (the localhost tests and CPU clusters); GPU and
  # TPU backends bring their own. (Newer JAX uses gloo by default and may drop the flag.)
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except (AttributeError, KeyError, ValueError):
    pass
  if num > 1:
    _watch_stderr(pid, num, env["LDM_JAX_COORDINATOR"], heartbeat_s, init_s, workdir)
  jax.distributed.initialize(env["LDM_JAX_COORDINATOR"], num_processes=num, process_id=pid,
                             local_device_ids=[int(i) for i in local.split(",")] if local else None,
                             **timeouts)
