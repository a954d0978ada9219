"""A 2-process run where one process is SIGKILLed mid-training: the survivor must stop
within a bounded time (LDM_JAX_HEARTBEAT_TIMEOUT) with a non-zero exit status and a
one-line `error:` naming the dead process, never hang."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ldm_jax import distributed
from ldm_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
HEARTBEAT_S = 10     # LDM_JAX_HEARTBEAT_TIMEOUT in the runs below
EXIT_BOUND_S = 60    # the survivor must be gone this long after the kill
START_BOUND_S = 240  # both processes logging training steps (slow on a busy 2-core CPU)
STEP_LINE = re.compile(r"step \d+/1000 ")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan", "inf", " "])
def test_timeout_variables_are_validated(monkeypatch, value):
  monkeypatch.setenv("LDM_JAX_HEARTBEAT_TIMEOUT", value)
  if not value.strip():  # empty: the default
    assert distributed._positive_seconds("LDM_JAX_HEARTBEAT_TIMEOUT", 60) == 60
    return
  with pytest.raises(UserError, match=re.escape(f"LDM_JAX_HEARTBEAT_TIMEOUT={value!r}")):
    distributed._positive_seconds("LDM_JAX_HEARTBEAT_TIMEOUT", 60)


def test_timeouts_reach_jax_initialize(monkeypatch):
  monkeypatch.setenv("LDM_JAX_INIT_TIMEOUT", "12.4")
  assert distributed._positive_seconds("LDM_JAX_INIT_TIMEOUT", 300) == 12
  import jax
  kwargs = distributed._distributed_timeouts(jax.distributed.initialize, 10, 30)
  assert kwargs == {"initialization_timeout": 30, "heartbeat_timeout_seconds": 10}

  def old_jax(coordinator_address=None, initialization_timeout=300,
              service_heartbeat_interval_seconds=10, service_max_missing_heartbeats=10,
              client_heartbeat_interval_seconds=10, client_max_missing_heartbeats=10):
    pass

  assert distributed._distributed_timeouts(old_jax, 25, 30) == {
      "initialization_timeout": 30, "service_heartbeat_interval_seconds": 2,
      "service_max_missing_heartbeats": 13, "client_heartbeat_interval_seconds": 2,
      "client_max_missing_heartbeats": 13}
  assert distributed._distributed_timeouts(lambda coordinator_address=None: None, 25, 30) == {}


def test_bad_heartbeat_timeout_is_a_clear_error(tmp_path):
  env = dict(os.environ, LDM_JAX_COORDINATOR="127.0.0.1:1", LDM_JAX_NUM_PROCESSES="2",
             LDM_JAX_PROCESS_ID="1", LDM_JAX_HEARTBEAT_TIMEOUT="ten")
  result = subprocess.run([sys.executable, "-m", "ldm_jax.main",
                           "--config=configs/quickstart.py:tiny", f"--workdir={tmp_path}/w"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "error: LDM_JAX_HEARTBEAT_TIMEOUT='ten' must be a number of seconds > 0" in result.stderr
  assert not (tmp_path / "w").exists()


_ABORT = ("F1123 client.h:80] Terminating process because the JAX distributed service "
          "detected fatal errors. This most likely indicates that another task died; ")


@pytest.mark.parametrize("me,text,expected", [
    ("0", _ABORT + "absl::Status: INTERNAL: Shutdown barrier has failed.\nBarrier result: "
     "'INTERNAL: Barrier failed because: task is set to ERROR: UNAVAILABLE: Task 1 heartbeat "
     "timeout. This indicates that the remote task has failed",
     "error: process 1 of 2 died or stopped responding (no heartbeat for "
     "LDM_JAX_HEARTBEAT_TIMEOUT=10 s), so process 0 stopped too. The last completed "
     "checkpoint in /w is intact"),
    ("1", "E1123 coordination_service_agent.cc:289] Polled an error from coordination service\n"
     + _ABORT + "absl::Status: UNAVAILABLE: Failed to send RPC to coordination service.\n"
     ":UNKNOWN:Error received from peer  {grpc_status:14, grpc_message:\"Socket closed\"}",
     "error: process 0 of 2 (the coordinator, 127.0.0.1:5) died or stopped responding, so "
     "process 1 stopped too."),
    ("1", _ABORT + "absl::Status: DEADLINE_EXCEEDED: Deadline Exceeded\n\nRPC: "
     "/xla.coordination.CoordinationService/RegisterTask",
     "error: process 1 could not join the multi-process run at 127.0.0.1:5: not all "
     "processes joined within LDM_JAX_INIT_TIMEOUT=30 s"),
    ("0", "Traceback (most recent call last):\nValueError: something else\n", None),
])
def test_stderr_helper_names_the_failed_process(me, text, expected):
  """The helper copies stderr unchanged and adds one `error:` line after a JAX abort."""
  result = subprocess.run(
      [sys.executable, "-m", "ldm_jax.peer_watch", str(os.getpid()), me, "2",
       "127.0.0.1:5", "10", "30", "/w"], input=text.encode(), capture_output=True, timeout=60)
  assert result.returncode == 0 and result.stdout == b""
  err = result.stderr.decode()
  assert err.startswith(text)
  added = err[len(text):]
  if expected is None:
    assert added == ""
  else:
    assert added.startswith(expected) and added.count("\n") == 1, added


def _start(run_dir, port, pid):
  env = dict(os.environ, LDM_JAX_COORDINATOR=f"127.0.0.1:{port}", LDM_JAX_NUM_PROCESSES="2",
             LDM_JAX_PROCESS_ID=str(pid), LDM_JAX_HEARTBEAT_TIMEOUT=str(HEARTBEAT_S),
             LDM_JAX_INIT_TIMEOUT=str(START_BOUND_S), PYTHONUNBUFFERED="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")  # 2 devices: quick start
  cache = os.path.join(os.path.expanduser("~"), ".cache", "ldm_jax", "jax_cache_tests")
  log = run_dir / f"process_{pid}.log"
  with open(log, "w") as out:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ldm_jax.main", "--config=configs/quickstart.py:tiny",
         f"--workdir={run_dir / 'run'}", "--config.num_train_steps=1000",
         "--config.ckpt.every_steps=1000", "--config.log_every_steps=1",
         f"--compilation_cache={cache}"],
        cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
  return proc, log


def test_survivor_stops_with_clear_error_when_a_peer_is_killed(tmp_path):
  """Two 2-process runs side by side (to share the start-up time): in one the worker
  (process 1) is killed, in the other the coordinator (process 0)."""
  runs = {}  # victim -> (processes, logs)
  try:
    for victim in (1, 0):
      run_dir = tmp_path / f"kill_{victim}"
      run_dir.mkdir()
      port = _free_port()
      runs[victim] = tuple(zip(*(_start(run_dir, port, pid) for pid in (0, 1))))
    all_logs = [log for _, logs in runs.values() for log in logs]
    deadline = time.time() + START_BOUND_S
    while not all(STEP_LINE.search(log.read_text(errors="replace")) for log in all_logs):
      for procs, logs in runs.values():
        assert all(p.poll() is None for p in procs), [l.read_text()[-3000:] for l in logs]
      assert time.time() < deadline, "no training steps from all processes"
      time.sleep(0.2)
    killed = time.time()
    for victim, (procs, _) in runs.items():
      procs[victim].send_signal(signal.SIGKILL)
    exited = {}  # victim -> (return code of the survivor, seconds after the kill)
    while len(exited) < len(runs) and time.time() < killed + EXIT_BOUND_S:
      for victim, (procs, _) in runs.items():
        if victim not in exited and procs[1 - victim].poll() is not None:
          exited[victim] = (procs[1 - victim].returncode, time.time() - killed)
      time.sleep(0.1)
    time.sleep(1.5)  # the stderr helper adds its line right after the process ends
    for victim, (procs, logs) in runs.items():
      assert victim in exited, (f"process {1 - victim} still running {EXIT_BOUND_S} s after "
                                f"process {victim} was killed")
      returncode, took = exited[victim]
      text = logs[1 - victim].read_text(errors="replace")
      assert returncode != 0, text[-3000:]
      errors = [l for l in text.splitlines() if l.startswith("error: ")]
      assert errors, text[-3000:]
      assert f"process {victim} of 2" in errors[-1], errors[-1]
      assert "died or stopped responding" in errors[-1] and "checkpoint" in errors[-1]
      print(f"process {1 - victim} exited with {returncode} {took:.1f} s after process "
            f"{victim} was killed: {errors[-1]}")
  finally:
    for procs, _ in runs.values():
      for p in procs:
        if p.poll() is None:
          p.kill()
        p.wait()


def test_sigterm_to_every_process_stops_all_after_the_same_step(tmp_path):
  """SLURM's scancel / a preemption SIGTERMs every process: JAX's preemption service
  agrees on one step, all processes checkpoint it together and exit 0."""
  port = _free_port()
  procs, logs = zip(*(_start(tmp_path, port, pid) for pid in (0, 1)))
  try:
    deadline = time.time() + START_BOUND_S
    while not all(STEP_LINE.search(log.read_text(errors="replace")) for log in logs):
      assert all(p.poll() is None for p in procs), [l.read_text()[-3000:] for l in logs]
      assert time.time() < deadline, "no training steps from both processes"
      time.sleep(0.2)
    for p in procs:
      p.send_signal(signal.SIGTERM)
    for p in procs:
      p.wait(timeout=EXIT_BOUND_S)
    texts = [log.read_text(errors="replace") for log in logs]
    assert [p.returncode for p in procs] == [0, 0], [t[-3000:] for t in texts]
    stops = [re.findall(r"SIGTERM: stopped after step (\d+) with a checkpoint", t) for t in texts]
    assert stops[0] and stops[0] == stops[1], [t[-2000:] for t in texts]
    assert (tmp_path / "run" / "checkpoints" / stops[0][0]).is_dir()
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()


def test_tpu_vm_abort_is_not_blamed_on_the_coordinator():
  """On TPU VMs (LDM_JAX_DISTRIBUTED=auto) this process's index is unknown to the
  watcher: the line must not claim process 0 died (this may be process 0)."""
  from ldm_jax import peer_watch
  text = "F0000 Terminating process because the JAX distributed service detected fatal errors"
  line = peer_watch.explain(text, "?", "?", "the TPU coordinator", "60", "300", "/w")
  assert line.startswith("a peer process died or stopped responding, so this process "
                         "stopped too"), line
  assert "restart all processes" in line
  assert peer_watch.explain("Traceback: ValueError", "?", "?", "c", "60", "300", "/w") is None
