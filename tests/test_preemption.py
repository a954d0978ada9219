"""Preemption and crash safety: SIGTERM stops cleanly with a checkpoint and exit 0;
SIGKILL at random moments (inside async checkpoint writes too) never loses or
corrupts anything and the run ends bit-identical to an uninterrupted one; the
retention policies; a diverging run stops naming the step."""

import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.helpers import REPO, run_cli, tiny_config

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "ldm_jax", "jax_cache_tests")
STEP_LINE = re.compile(r"step (\d+)/(\d+)")


def start_cli(*args, devices: int | None = None):
  """`python -m ldm_jax.main ARGS` as a running process (stdout+stderr merged, text),
  optionally with its own number of CPU devices."""
  env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return subprocess.Popen([sys.executable, "-m", "ldm_jax.main", f"--compilation_cache={CACHE}",
                           *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def restored_state(workdir, config):
  from ldm_jax.training.checkpoint import Checkpointer
  from ldm_jax.training.setup import build_training
  checkpointer = Checkpointer(str(workdir), read_only=True)
  try:
    return checkpointer.latest_step(), jax.device_get(
        checkpointer.restore(build_training(config).abstract_state))
  finally:
    checkpointer.close()


def assert_states_identical(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sigterm_finishes_the_step_checkpoints_and_exits_0(tmp_path):
  workdir = tmp_path / "run"
  args = ["--config=configs/quickstart.py:tiny", f"--workdir={workdir}",
          "--config.num_train_steps=100000", "--config.ckpt.every_steps=100000",
          "--config.log_every_steps=1"]
  process = start_cli(*args)
  lines = []
  try:
    for line in process.stdout:  # wait until it is training
      lines.append(line)
      if STEP_LINE.search(line):
        break
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
  finally:
    process.kill()
  text = "".join(lines) + out
  assert process.returncode == 0, text[-3000:]
  stopped = re.search(r"SIGTERM: stopped after step (\d+) with a checkpoint", text)
  assert stopped, text[-3000:]
  step = int(stopped.group(1))
  assert (workdir / "checkpoints" / str(step)).is_dir()
  # The same command resumes from that step.
  result = run_cli(*args, "--config.max_steps_per_run=2")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"starting at step {step} of 100000" in result.stdout
  assert (workdir / "checkpoints" / str(step + 2)).is_dir()


def test_chaos_sigkill_many_times_ends_bit_identical(tmp_path):
  """≥ 10 SIGKILLs at random moments, each followed by a relaunch of the same command;
  with a checkpoint every step many land inside an asynchronous write. The final
  state equals an uninterrupted run's bit for bit, and every relaunch restored
  cleanly (a partial checkpoint is never read: it would fail the relaunch)."""
  steps = 40
  args = ["--config=configs/quickstart.py:tiny", "--config.num_train_steps=%d" % steps,
          "--config.ckpt.every_steps=1", "--config.ckpt.max_to_keep=2",
          "--config.log_every_steps=1", "--config.eval.every_steps=0"]
  reference = tmp_path / "reference"
  started = time.time()
  # One device per process: an Orbax save of the 8-way replicated state takes ~2 s on
  # this CPU, of a single-device one ~0.5 s; the chaos is the same.
  process = start_cli(*args, f"--workdir={reference}", devices=1)
  out, _ = process.communicate(timeout=600)
  total = time.time() - started
  assert process.returncode == 0, out[-3000:]

  workdir = tmp_path / "chaos"
  rng = random.Random(0)
  kills, during_write, relaunches = 0, 0, 0
  ckpt = workdir / "checkpoints"
  first_step_at = None  # launch -> first step line of a warm (compile-cached) relaunch

  def partial_writes():
    return {n for n in os.listdir(ckpt) if "tmp" in n} if ckpt.is_dir() else set()

  def life(number):
    """One launch, SIGKILLed; returns (killed, output). Even lives die 0-0.6 s after
    their first training step, where a checkpoint write (every step) is almost always in
    flight (and measure how long a relaunch takes to reach it); odd ones at a random
    moment between 0.3 and 1.2 times that: starting, compiling, restoring or training.
    At most a few steps per life, so 10 lives never finish the 40 steps."""
    nonlocal first_step_at
    launched = time.time()
    process = start_cli(*args, f"--workdir={workdir}", devices=1)
    if number % 2 == 1 and first_step_at:
      deadline = launched + rng.uniform(0.3 * first_step_at, 1.2 * first_step_at)
    else:
      deadline = None
      for line in process.stdout:
        if STEP_LINE.search(line):
          first_step_at = time.time() - launched
          deadline = time.time() + rng.uniform(0.0, 0.6)
          break
    try:
      out, _ = process.communicate(timeout=max(0.0, deadline - time.time()) if deadline else 60)
      assert process.returncode == 0, out[-3000:]  # a relaunch that fails: never
      return False, out
    except subprocess.TimeoutExpired:
      process.send_signal(signal.SIGKILL)
      return True, process.communicate()[0]

  while kills < 10:
    before = partial_writes()
    killed, out = life(relaunches)
    relaunches += 1
    if not killed:
      break  # it finished before the kill
    kills += 1
    during_write += bool(partial_writes() - before)  # killed inside a checkpoint write
  final = start_cli(*args, f"--workdir={workdir}", devices=1)
  out, _ = final.communicate(timeout=600)
  assert final.returncode == 0, out[-3000:]
  assert not partial_writes()  # a relaunch removes what a killed write left behind
  print(f"chaos: {kills} SIGKILLs over {relaunches} launches, {during_write} with a checkpoint "
        f"write in flight; reference run {total:.1f} s, a relaunch reaches its first step "
        f"in {first_step_at:.1f} s")
  assert kills >= 10 and during_write >= 1

  config = tiny_config()
  ref_step, ref_state = restored_state(reference, config)
  step, state = restored_state(workdir, config)
  assert ref_step == step == steps
  assert_states_identical(state, ref_state)


def test_keep_last_n_and_every_k(tmp_path):
  from ldm_jax.training.checkpoint import Checkpointer
  checkpointer = Checkpointer(str(tmp_path), max_to_keep=2, keep_every=4)
  state = {"w": np.arange(3, dtype=np.float32)}
  for step in range(1, 11):
    checkpointer.save(step, state, None, {"step": step}, force=True)
  checkpointer.close()
  assert sorted(Checkpointer(str(tmp_path), read_only=True).all_steps()) == [4, 8, 9, 10]


def test_a_diverging_run_stops_naming_the_step_and_metric(tmp_path):
  result = run_cli("--config=configs/quickstart.py:tiny", f"--workdir={tmp_path}/w",
                   "--config.optim.learning_rate=1e38", "--config.ckpt.every_steps=4",
                   "--config.optim.grad_clip=0")
  assert result.returncode == 2, result.stderr[-2000:]
  message = re.search(r"error: training diverged at step (\d+): (\w+) = (\S+)", result.stderr)
  assert message, result.stderr[-2000:]
  bad_step = int(message.group(1))
  saved = [int(s) for s in os.listdir(tmp_path / "w" / "checkpoints") if s.isdigit()]
  assert all(s < bad_step for s in saved)  # no checkpoint holds the NaNs


@pytest.mark.parametrize("value,valid", [("ckpt.keep_every_steps=-1", "must be >= 0"),
                                         ("ckpt.max_to_keep=0", "must be >= 1")])
def test_bad_retention_values_are_clear_errors(tmp_path, value, valid):
  result = run_cli("--config=configs/quickstart.py:tiny", f"--workdir={tmp_path}/w",
                   f"--config.{value}")
  assert result.returncode == 2 and valid in result.stderr, result.stderr[-2000:]
