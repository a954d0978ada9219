"""Every mistake a user can make on the command line: one clear message naming the
bad value and what is valid, a non-zero exit, and nothing overwritten."""

import os
import shutil

import pytest

from tests.helpers import run_cli, tree_snapshot

TINY = "--config=configs/quickstart.py:tiny"


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("cli") / "run")
  result = run_cli(TINY, f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def _fails(result, *needles):
  assert result.returncode != 0, result.stdout[-2000:]
  text = result.stderr + result.stdout
  for needle in needles:
    assert needle in text, f"{needle!r} not in output:\n{text[-3000:]}"
  assert "Traceback" not in result.stderr, result.stderr[-3000:]


def test_missing_config_file(tmp_path):
  _fails(run_cli("--config=configs/nope.py", f"--workdir={tmp_path}/w"), "configs/nope.py",
         "does not exist")


def test_unknown_config_key(tmp_path):
  _fails(run_cli(TINY, "--config.data.bogus=1", f"--workdir={tmp_path}/w"),
         "unknown config key 'data.bogus'", "batch_size")


def test_unknown_preset(tmp_path):
  _fails(run_cli("--config=configs/quickstart.py:huge", f"--workdir={tmp_path}/w"),
         "'huge'", "valid")


def test_unknown_model_variant(tmp_path):
  _fails(run_cli(TINY, "--config.model.variant=giant", f"--workdir={tmp_path}/w"),
         "'giant'", "valid")


def test_image_size_not_divisible_by_patch(tmp_path):
  _fails(run_cli("--config=configs/quickstart.py:dit", "--config.num_train_steps=1",
                 "--config.model.variant=DiT-S/8", f"--workdir={tmp_path}/w"),
         "image size 28 is not divisible by patch size 8")


@pytest.mark.parametrize("num", ["0", "-5"])
def test_nonpositive_sample_num(tmp_path, num):
  _fails(run_cli(TINY, f"--config.sample.num={num}", f"--workdir={tmp_path}/w"),
         f"sample.num must be > 0, got {num}")


def test_workdir_is_a_file(tmp_path):
  path = tmp_path / "file"
  path.write_text("keep me")
  _fails(run_cli(TINY, f"--workdir={path}"), str(path), "not a directory")
  assert path.read_text() == "keep me"


def test_workdir_not_creatable(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  _fails(run_cli(TINY, f"--workdir={blocker}/sub"), "cannot be created")


def test_workdir_on_a_read_only_filesystem(tmp_path):
  # (The not-writable branch itself is unit-tested in test_run_config.py: root writes anywhere.)
  _fails(run_cli(TINY, "--workdir=/proc/ldm_jax_run"), "/proc/ldm_jax_run", "cannot be created")


def test_sample_without_checkpoint(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  _fails(run_cli(TINY, f"--workdir={empty}", "--mode=sample"), "no checkpoint", "train first")
  _fails(run_cli(TINY, f"--workdir={tmp_path}/missing", "--mode=sample"), "does not exist")
  assert not os.path.exists(tmp_path / "missing")


def test_sampler_that_does_not_fit_the_process(tmp_path):
  _fails(run_cli(TINY, "--config.sample.sampler=ddim", f"--workdir={tmp_path}/w"),
         "sample.sampler='ddim'", "flow", "['euler']")
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_guidance_without_a_null_class(tmp_path):
  _fails(run_cli(TINY, "--config.model.class_dropout_prob=0.0", f"--workdir={tmp_path}/w"),
         "sample.guidance_scale=1.5 needs the null class", "class_dropout_prob")


def test_unknown_mode(tmp_path):
  _fails(run_cli(TINY, f"--workdir={tmp_path}/w", "--mode=eval2"), "'eval2'", "train")


def test_incompatible_config_leaves_run_untouched(trained_workdir):
  before = tree_snapshot(trained_workdir)
  _fails(run_cli(TINY, "--config.model.variant=mnist", f"--workdir={trained_workdir}"),
         "incompatible config", "model.variant", "'tiny'", "'mnist'")
  _fails(run_cli(TINY, "--config.diffusion.process=gaussian", "--mode=sample",
                 f"--workdir={trained_workdir}"), "diffusion.process")
  assert tree_snapshot(trained_workdir) == before


def test_corrupt_checkpoint_is_reported_and_kept(trained_workdir, tmp_path):
  workdir = str(tmp_path / "corrupt")
  shutil.copytree(trained_workdir, workdir)
  state_dir = os.path.join(workdir, "checkpoints", "6", "state")
  # Every OCDBT data file cut in half (with 8 devices writing in parallel there are
  # several; one alone may hold only bytes that another write superseded).
  files = [os.path.join(r, f) for r, _, fs in os.walk(state_dir) for f in fs
           if os.path.basename(r) == "d"]
  assert files
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  before = tree_snapshot(workdir)
  for mode in ("train", "sample"):
    _fails(run_cli(TINY, "--config.num_train_steps=9", f"--workdir={workdir}", f"--mode={mode}"),
           "corrupt or truncated", os.path.join("checkpoints", "6"))
  assert tree_snapshot(workdir) == before


def test_bpd_mode_end_to_end_and_its_errors(tmp_path, trained_workdir):
  """--mode=bpd on a tiny learned-Σ DiT trained with the hybrid loss: a finite bound in
  a new directory, never overwriting; a flow run is refused with one clear line."""
  import json
  workdir = str(tmp_path / "sigma")
  args = ("--config=configs/quickstart.py:tiny", "--config.model.name=dit",
          "--config.model.variant=DiT-tiny/2", "--config.model.learn_sigma=True",
          "--config.diffusion.process=gaussian", "--config.diffusion.variance_type=learned_range",
          "--config.sample.sampler=ddpm", "--config.eval.bpd_num=6",
          "--config.eval.bpd_batch_size=4", "--config.eval.bpd_num_terms=5")
  result = run_cli(*args, f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "vlb" in result.stdout + result.stderr  # the hybrid loss's metrics are logged
  for run in range(2):
    result = run_cli(*args, f"--workdir={workdir}", "--mode=bpd")
    assert result.returncode == 0, result.stderr[-3000:]
  first = json.load(open(os.path.join(workdir, "likelihood", "bpd-6", "bpd.json")))
  second = json.load(open(os.path.join(workdir, "likelihood", "bpd-6-1", "bpd.json")))
  assert first == second  # deterministic, and the second run wrote a new directory
  assert first["num_images"] == 6 and first["num_terms"] == 5
  assert 0 < first["bits_per_dim"] < 100 and first["variance_type"] == "learned_range"
  before = tree_snapshot(trained_workdir)
  _fails(run_cli(TINY, f"--workdir={trained_workdir}", "--mode=bpd"),
         "--mode=bpd evaluates the variational bound of a gaussian process")
  assert tree_snapshot(trained_workdir) == before


@pytest.mark.parametrize("overrides,needles", [
    (("--config.diffusion.prediction=v",), ("diffusion.prediction='v'", "rectified flow")),
    (("--config.diffusion.process=gaussian", "--config.sample.sampler=ddim",
      "--config.diffusion.variance_type=learned_range"),
     ("variance_type='learned_range'", "learn_sigma")),
    (("--config.diffusion.process=gaussian", "--config.sample.sampler=ddim",
      "--config.diffusion.loss_weighting=p2"), ("'p2'", "min_snr")),
    (("--config.diffusion.time_sampling=lognormal",), ("'lognormal'", "cosmap")),
])
def test_bad_process_combinations(tmp_path, overrides, needles):
  _fails(run_cli(TINY, *overrides, f"--workdir={tmp_path}/w"), *needles)
  assert not os.path.exists(tmp_path / "w")
