"""Orbax checkpoints of the whole run: TrainState (params, optimizer, EMA, step,
RNG), the Grain iterator state and the resolved config, saved as one composite
step directory under `workdir/checkpoints/`."""

import io
import json
import os
import sys
import time

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from ldm_jax.errors import UserError, check


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def _wait_until_quiet(buffer: io.StringIO, quiet_s: float = 0.5, at_most_s: float = 5.0):
  """Returns once nothing was written to `buffer` for `quiet_s` seconds (or after
  `at_most_s`)."""
  deadline, size, quiet_since = time.time() + at_most_s, -1, time.time()
  while time.time() < deadline:
    if len(buffer.getvalue()) != size:
      size, quiet_since = len(buffer.getvalue()), time.time()
    elif time.time() - quiet_since >= quiet_s:
      return
    time.sleep(0.1)


class Checkpointer:
  """Saves / restores {state, data_iter, config} composites every `every_steps`."""

  def __init__(self, workdir: str, max_to_keep: int = 3, read_only: bool = False,
               keep_every: int = 0):
    """Keeps the newest `max_to_keep` checkpoints and, with `keep_every` = K > 0, also
    every one whose step is a multiple of K. Saves are asynchronous: a step directory
    appears (atomically renamed from a temporary one) only once complete."""
    self.directory = checkpoint_dir(workdir)
    check(max_to_keep >= 1, f"ckpt.max_to_keep must be >= 1, got {max_to_keep}")
    check(keep_every >= 0, f"ckpt.keep_every_steps must be >= 0, got {keep_every}")
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                           read_only=read_only, keep_period=keep_every or None,
                                           enable_async_checkpointing=True,
                                           # leftovers of a write cut short by a crash
                                           cleanup_tmp_directories=not read_only)
    handlers = {"state": ocp.StandardCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
                "data_iter": grain.checkpoint.CheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iter, config_dict: dict, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config_dict)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state, data_iter=None, step: int | None = None):
    """Restores the given (or latest) step into the structure of `abstract_state`
    (and `data_iter`, in place). Any failure becomes a `UserError` naming the path."""
    step = self.latest_step() if step is None else step
    check(step is not None, f"no checkpoint found in {self.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    path = os.path.join(self.directory, str(step))
    # TensorStore's callbacks print asyncio tracebacks from background threads when a
    # read fails; hold stderr while restoring so a damaged file yields one clear error.
    held, sys.stderr = sys.stderr, io.StringIO()
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
      state = restored["state"]
      jax.block_until_ready(state)
    except Exception as e:  # orbax / tensorstore raise many types for damaged files
      _wait_until_quiet(sys.stderr)  # the failing background reads print for a while
      sys.stderr = held
      others = [s for s in self.all_steps() if s != step]
      raise UserError(
          f"checkpoint {path} is corrupt or truncated and cannot be restored "
          f"({type(e).__name__}: {str(e).splitlines()[0][:300]}). Nothing was changed. "
          f"Move that directory away to resume from an earlier step "
          f"(others present: {others or 'none'}), or use a new --workdir.") from e
    finally:
      if sys.stderr is not held:  # success: pass on anything written meanwhile
        held.write(sys.stderr.getvalue())
        sys.stderr = held
    logging.info("restored checkpoint %s", path)
    return state

  def restore_config(self, step: int | None = None) -> dict | None:
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    path = os.path.join(self.directory, str(step), "config", "metadata")
    try:
      with open(path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return None

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
