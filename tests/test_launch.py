"""The launch scripts' --dry-run output and option errors (no network, nothing run)."""

import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"


def run(script, *args, env=None):
  full_env = dict(os.environ, **(env or {}))
  return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=ROOT, env=full_env,
                        capture_output=True, text=True, timeout=30)


def lines(result):
  assert result.returncode == 0, result.stderr
  return result.stdout.strip().splitlines()


def words(line):
  return shlex.split(line)


def test_tpu_single_host_create_setup_run_delete():
  out = lines(run("tpu/run.sh", "all", "--name=dit", "--zone=us-east5-a", "--project=proj",
                  "--accelerator-type=v5p-8", "--copy", "--config=configs/quickstart.py:dit",
                  "--workdir=/gcs/b/runs/dit", "--teardown", "--dry-run", "--",
                  "--config.num_train_steps=100"))
  create, ssh_run, delete = words(out[0]), words(out[-2]), words(out[-1])
  assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
  assert create[5] == "dit"
  assert {"--zone=us-east5-a", "--project=proj", "--accelerator-type=v5p-8"} <= set(create)
  assert any(w.startswith("--version=") for w in create)
  assert any(line.startswith("tar -czf") for line in out)
  scp = [words(l) for l in out if " tpu-vm scp " in l]
  assert len(scp) == 1 and "--worker=all" in scp[0]
  ssh = [words(l) for l in out if " tpu-vm ssh " in l]
  assert len(ssh) == 2 and all("--worker=all" in s and s[5] == "dit" for s in ssh)
  setup_cmd = ssh[0][-1]
  assert "python3 -m venv .venv" in setup_cmd
  assert "pip install -c constraints.txt -e ." in setup_cmd
  assert ssh_run == ssh[1]
  remote = ssh_run[-1].removeprefix("--command=")
  assert ("env LDM_JAX_DISTRIBUTED=auto python -m ldm_jax.main --config=configs/quickstart.py:dit "
          "--workdir=/gcs/b/runs/dit --mode=train --config.num_train_steps=100") in remote
  assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "dit"]
  assert "--zone=us-east5-a" in delete


def test_tpu_multislice_uses_queued_resources_with_node_count():
  out = lines(run("tpu/run.sh", "all", "--name=ms", "--zone=us-central2-b",
                  "--accelerator-type=v5litepod-16", "--num-slices=2",
                  "--repo-url=https://example.com/ldm_jax.git", "--config=c.py",
                  "--workdir=/gcs/b/w", "--teardown", "--dry-run"))
  create = words(out[0])
  assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
  assert {"--node-count=2", "--node-prefix=ms", "--accelerator-type=v5litepod-16"} <= set(create)
  assert any(w.startswith("--runtime-version=") for w in create)
  assert words(out[1])[:5] == ["gcloud", "compute", "tpus", "queued-resources", "describe"]
  ssh = [l for l in out if " tpu-vm ssh " in l]
  # setup and run on both slices' nodes, in parallel, every worker.
  assert len(ssh) == 4 and all(l.endswith(" &") and "--worker=all" in l for l in ssh)
  assert {words(l.removesuffix(" &"))[5] for l in ssh} == {"ms-0", "ms-1"}
  assert "git clone https://example.com/ldm_jax.git" in ssh[0]
  delete = words(out[-1])
  assert delete[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "ms"]
  assert "--force" in delete


def test_tpu_queued_single_slice_and_subcommands():
  create = lines(run("tpu/run.sh", "create", "--name=q", "--zone=z", "--accelerator-type=v4-8",
                     "--queued", "--spot", "--dry-run"))
  assert words(create[0])[3:6] == ["queued-resources", "create", "q"]
  assert {"--node-id=q", "--spot"} <= set(words(create[0]))
  logs = lines(run("tpu/run.sh", "logs", "--name=q", "--zone=z", "--dry-run"))
  assert len(logs) == 1 and "--worker=0" in logs[0] and "tail" in logs[0]
  delete = lines(run("tpu/run.sh", "delete", "--name=q", "--zone=z", "--dry-run"))
  assert words(delete[0])[3:6] == ["tpu-vm", "delete", "q"]


def test_slurm_batch_script_coordinator_and_tasks(tmp_path):
  scontrol = tmp_path / "scontrol"  # stands in for SLURM's: the node list expanded
  scontrol.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "gpu-a01\\ngpu-a02\\n"\n')
  scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
  env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "LDM_JAX_DRY_RUN": "1",
         "SLURM_JOB_NODELIST": "gpu-a[01-02]", "SLURM_NTASKS": "2", "LDM_JAX_PORT": "23456"}
  out = lines(run("gpu/slurm.sbatch", "configs/quickstart.py:dit", "/shared/runs/dit",
                  "--config.num_train_steps=5", env=env))
  assert out[0] == "export LDM_JAX_COORDINATOR=gpu-a01:23456"
  assert out[1] == "export LDM_JAX_NUM_PROCESSES=2"
  srun = words(out[2])
  assert srun[:3] == ["srun", "--kill-on-bad-exit=1", "--ntasks=2"]
  assert "export LDM_JAX_PROCESS_ID=$SLURM_PROCID" in srun[srun.index("-c") + 1]
  assert srun[-5:] == ["-m", "ldm_jax.main", "--config=configs/quickstart.py:dit",
                       "--workdir=/shared/runs/dit", "--config.num_train_steps=5"]
  script = (LAUNCH / "gpu/slurm.sbatch").read_text()
  assert re.search(r"^#SBATCH --nodes=", script, re.M)
  assert "scontrol show hostnames" in script
  outside = run("gpu/slurm.sbatch", "c.py", "w", env={"SLURM_JOB_NODELIST": "", "SLURM_NTASKS": ""})
  assert outside.returncode == 2 and "SLURM_JOB_NODELIST" in outside.stderr


def test_slurm_submit_and_single_node():
  out = lines(run("gpu/submit.sh", "--nodes=4", "--gpus-per-node=8", "--per-gpu",
                  "--partition=gpu", "--config=configs/quickstart.py:dit", "--workdir=/shared/r",
                  "--dry-run", "--", "--config.num_train_steps=5"))
  assert len(out) == 1
  sbatch = words(out[0])
  assert sbatch[0] == "sbatch"
  assert {"--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu"} <= set(sbatch)
  assert sbatch[-5].endswith("launch/gpu/slurm.sbatch")
  assert sbatch[-4:] == ["configs/quickstart.py:dit", "/shared/r", "--mode=train",
                         "--config.num_train_steps=5"]
  per_node = words(lines(run("gpu/submit.sh", "--nodes=2", "--config=c", "--workdir=w",
                             "--dry-run"))[0])
  assert "--ntasks-per-node=1" in per_node
  single = lines(run("gpu/single_node.sh", "--config=c.py", "--workdir=w", "--gpus=0,1",
                     "--dry-run", "--", "--config.a=1"))
  assert single == ["env CUDA_VISIBLE_DEVICES=0,1 python -m ldm_jax.main --config=c.py "
                    "--workdir=w --mode=train --config.a=1"]


def test_local_multiprocess_distinct_ids_one_coordinator():
  out = lines(run("local/multiprocess.sh", "-n", "3", "--port=23456",
                  "--config=configs/quickstart.py:tiny", "--workdir=runs/mp", "--dry-run", "--",
                  "--config.num_train_steps=2"))
  procs = [l for l in out if "ldm_jax.main" in l]
  assert len(procs) == 3
  ids, coordinators = [], set()
  for line in procs:
    w = words(line.removesuffix(" &").split(" > ")[0])
    env = dict(x.split("=", 1) for x in w[1:4])
    ids.append(int(env["LDM_JAX_PROCESS_ID"]))
    coordinators.add(env["LDM_JAX_COORDINATOR"])
    assert env["LDM_JAX_NUM_PROCESSES"] == "3"
    assert w[-4:] == ["--config=configs/quickstart.py:tiny", "--workdir=runs/mp", "--mode=train",
                      "--config.num_train_steps=2"]
  assert sorted(ids) == [0, 1, 2]
  assert coordinators == {"127.0.0.1:23456"}
  assert out[-1] == "wait"


def test_local_train_sh_still_usage_checks():
  result = run("local/train.sh")
  assert result.returncode != 0 and "usage: train.sh" in result.stderr


@pytest.mark.parametrize("script,args,missing", [
    ("tpu/run.sh", ["run", "--zone=z", "--config=c", "--workdir=w"], "--name"),
    ("tpu/run.sh", ["create", "--name=n", "--zone=z"], "--accelerator-type"),
    ("tpu/run.sh", ["setup", "--name=n", "--zone=z"], "--copy or --repo-url"),
    ("gpu/submit.sh", ["--workdir=w"], "--config"),
    ("gpu/single_node.sh", ["--config=c"], "--workdir"),
    ("local/multiprocess.sh", ["--config=c", "--workdir=w"], "-n/--num-processes"),
])
def test_missing_required_option_exits_2(script, args, missing):
  result = run(script, *args, "--dry-run")
  assert result.returncode == 2
  assert f"missing required option {missing}" in result.stderr
  assert "valid options:" in result.stderr


@pytest.mark.parametrize("script,args", [
    ("tpu/run.sh", ["run"]),
    ("gpu/submit.sh", []),
    ("gpu/single_node.sh", []),
    ("local/multiprocess.sh", ["-n", "2"]),
])
def test_unknown_option_exits_2_naming_it(script, args):
  result = run(script, *args, "--frobnicate=3", "--dry-run")
  assert result.returncode == 2
  assert "unknown option --frobnicate" in result.stderr
  assert "valid options:" in result.stderr and "--dry-run" in result.stderr
  assert result.stdout == ""


def test_tpu_unknown_subcommand_and_help():
  result = run("tpu/run.sh", "launch", "--name=n", "--zone=z")
  assert result.returncode == 2 and "unknown subcommand launch" in result.stderr
  assert "create setup run logs delete all" in result.stderr
  for script in ("tpu/run.sh", "gpu/submit.sh", "gpu/single_node.sh", "local/multiprocess.sh"):
    help_ = run(script, "--help")
    assert help_.returncode == 0 and "usage:" in help_.stdout and "--dry-run" in help_.stdout


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
  """launch/local/multiprocess.sh really starts 2 JAX processes (jax.distributed over
  gloo on localhost, wired through the LDM_JAX_* variables) of 4 CPU devices each, on an
  8-way fsdp mesh: every parameter is split across both processes. Each process loads
  only its half of every global batch, yet the run equals one process with 8 devices:
  the same logged losses and the same checkpointed state (collective Orbax save of the
  cross-process shards, restored here); the final sample grid is gathered and written."""
  import random
  import jax
  workdir, single = tmp_path / "mp", tmp_path / "single"
  port = str(random.randint(20000, 40000))
  cache = os.path.join(os.path.expanduser("~"), ".cache", "ldm_jax", "jax_cache_tests")
  # Adam's ε raised as in tests/mesh_equivalence.py: with 1e-8 a gradient element near 0
  # (whose value the all-reduce order changes relatively a lot) moves by ±lr.
  # fsdp over all 8 devices: parameters (and their checkpoint) split across the processes.
  common = ["--config.num_train_steps=4", "--config.ckpt.every_steps=2",
            "--config.log_every_steps=1", "--config.optim.eps=1e-3",
            "--config.mesh.shape=(1,8,1)",
            f"--compilation_cache={cache}"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  result = subprocess.run(
      ["bash", str(LAUNCH / "local/multiprocess.sh"), "-n", "2", f"--port={port}",
       f"--python={sys.executable}",
       "--config=configs/quickstart.py:tiny", f"--workdir={workdir}", "--", *common],
      cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
  pattern = r"step \d+/4 .* loss (\S+)"
  losses_0 = re.findall(pattern, result.stdout + result.stderr)
  losses_1 = re.findall(pattern, (workdir / "logs/process_1.log").read_text())
  assert len(losses_0) == 4 and losses_0 == losses_1
  assert (workdir / "grids" / "step_0000004.png").exists()
  one = subprocess.run(
      [sys.executable, "-m", "ldm_jax.main", "--config=configs/quickstart.py:tiny",
       f"--workdir={single}", *common], cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  assert one.returncode == 0, one.stderr[-3000:]
  assert re.findall(pattern, one.stdout + one.stderr) == losses_0

  from ldm_jax.training.checkpoint import Checkpointer
  from ldm_jax.training.setup import build_training
  from tests.helpers import tiny_config
  abstract = build_training(tiny_config(**{"mesh.shape": (1, 8, 1)})).abstract_state
  states = []
  for run in (workdir, single):
    checkpointer = Checkpointer(str(run), read_only=True)
    assert checkpointer.latest_step() == 4
    states.append(jax.device_get(checkpointer.restore(abstract)))
    checkpointer.close()
  from tests.mesh_equivalence import max_relative_difference
  trained = [(s.params, s.opt_state, s.ema_params) for s in states]
  assert max_relative_difference(*trained) <= 1e-5  # gloo vs in-process all-reduce order
  assert int(states[0].step) == int(states[1].step) == 4


def test_bad_process_environment_is_a_clear_error(tmp_path):
  env = dict(os.environ, LDM_JAX_COORDINATOR="127.0.0.1:1", LDM_JAX_NUM_PROCESSES="2",
             LDM_JAX_PROCESS_ID="5")
  result = subprocess.run([sys.executable, "-m", "ldm_jax.main", "--config=configs/quickstart.py:tiny",
                           f"--workdir={tmp_path}/w"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 2 and "LDM_JAX_PROCESS_ID=5 must be in [0, 2)" in result.stderr
  assert not (tmp_path / "w").exists()
