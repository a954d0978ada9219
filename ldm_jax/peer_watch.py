"""Stderr pass-through for a multi-process run, started by ldm_jax/distributed.py:

  python -m ldm_jax.peer_watch PARENT_PID PROCESS_ID NUM_PROCESSES COORDINATOR \
      HEARTBEAT_S INIT_S WORKDIR   < (the training process's stderr)

Copies everything unchanged; when the run ended in JAX's coordination-service abort
(a peer died or stopped responding, or peers never joined), adds one `error:` line
naming the failed process and saying the last checkpoint is intact.
"""

import os
import re
import select
import signal
import sys

TAIL_BYTES = 200_000  # how much of the end of stderr is kept to explain an abort


def pass_through(parent_pid: int) -> str:
  """Copies stdin to stderr until the training process (and every child holding the
  pipe) is gone; returns the last TAIL_BYTES as text."""
  out, tail = sys.stderr.buffer, b""

  def copy(data: bytes):
    nonlocal tail
    tail = (tail + data)[-TAIL_BYTES:]
    try:
      out.write(data)
      out.flush()
    except OSError:
      pass

  while True:
    if select.select([0], [], [], 1.0)[0]:
      data = os.read(0, 65536)
      if not data:
        break
      copy(data)
    elif os.getppid() != parent_pid:  # gone, but a child of it still holds the pipe
      os.set_blocking(0, False)
      try:
        copy(os.read(0, 1 << 20))
      except OSError:
        pass
      break
  return tail.decode("utf-8", "replace")


def explain(text: str, me: str, num: str, coordinator: str, heartbeat: str, init: str,
            workdir: str) -> str | None:
  """The one-line explanation of a coordination-service abort in `text`, or None when
  the run did not end that way. `me` / `num` are "?" when unknown (TPU VMs)."""
  if not ("JAX distributed service detected fatal errors" in text
          or "Terminating process" in text and "oordination" in text):
    return None
  of_num, every = (f" of {num}", f"all {num} processes") if num != "?" else ("", "all processes")
  if "RegisterTask" in text:
    return (f"process {me} could not join the multi-process run at {coordinator}: not all "
            f"processes joined within LDM_JAX_INIT_TIMEOUT={init} s (did every process "
            f"start? is the coordinator, process 0, reachable?)")
  unhealthy = re.findall(r"stopped sending heartbeats\):\s*([\d, ]+)", text)
  dead = sorted({int(t) for t in re.findall(r"[Tt]ask:? ?(\d+) heartbeat timeout", text)}
                | {int(t) for group in unhealthy for t in re.findall(r"\d+", group)})
  dead = [d for d in dead if str(d) != me]
  if dead:
    who = ("process " + ", ".join(map(str, dead)) + f"{of_num} died or stopped responding "
           f"(no heartbeat for LDM_JAX_HEARTBEAT_TIMEOUT={heartbeat} s)")
  elif me not in ("0", "?"):
    who = f"process 0{of_num} (the coordinator, {coordinator}) died or stopped responding"
  else:  # process 0 itself, or a TPU VM run where this process's index is not known here
    who = "a peer process died or stopped responding"
  this = "this process" if me == "?" else f"process {me}"
  return (f"{who}, so {this} stopped too. The last completed checkpoint in {workdir} is "
          f"intact (checkpoints are written atomically): restart {every} to resume from it")


def main(argv) -> int:
  for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)  # outlive the training process, never die before it
  parent, me, num, coordinator, heartbeat, init, workdir = argv[1:8]
  message = explain(pass_through(int(parent)), me, num, coordinator, heartbeat, init, workdir)
  if message:
    sys.stderr.buffer.write(f"error: {message}\n".encode())
    sys.stderr.buffer.flush()
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
