"""The training loop end to end on the `tiny` quickstart preset: checkpoints,
TensorBoard events, sample outputs, and exact resume."""

import json
import os

import jax
import numpy as np
import pytest

from ldm_jax.sample import sample_from_workdir
from ldm_jax.train import train_and_evaluate
from tests.helpers import read_events, run_cli, tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("tiny"))
  config = tiny_config()
  state = train_and_evaluate(config, workdir)
  return workdir, config, state


def test_training_writes_checkpoints_config_and_events(trained):
  workdir, config, state = trained
  assert int(state.step) == config.num_train_steps
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))) == [3, 6]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["variant"] == "tiny"
  events = read_events(os.path.join(workdir, "tensorboard"))
  scalars = {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value
             if v.HasField("simple_value")}
  assert {("loss", 2), ("loss", 4), ("loss", 6), ("grad_norm", 6)} <= set(scalars)
  # Warm-up over 2 steps, then cosine decay to 0 at step 6 (means over the window).
  assert scalars[("learning_rate", 2)] == pytest.approx(config.optim.learning_rate / 4)
  assert scalars[("learning_rate", 6)] < scalars[("learning_rate", 4)]
  assert all(np.isfinite(v) for v in scalars.values())
  images = [v for e in events for v in e.summary.value if v.HasField("image")]
  assert images and images[0].image.height > 28
  assert os.path.exists(os.path.join(workdir, "grids", "step_0000006.png"))
  # EMA moved away from the raw params but not too far (warm-up EMA).
  leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(), state.params, state.ema_params))
  assert 0 < max(leaves) < 1


def test_sample_mode_writes_npz_and_grid(trained):
  workdir, _, _ = trained
  config = tiny_config(**{"sample.num": 11, "sample.batch_size": 4})  # 4 ∤ 11
  out_dir = sample_from_workdir(config, workdir)
  with np.load(os.path.join(out_dir, "samples.npz")) as data:
    images, labels = data["arr_0"], data["arr_1"]
  assert images.shape == (11, 28, 28, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0])
  assert os.path.exists(os.path.join(out_dir, "grid.png"))
  assert images.std() > 0
  # A second run never overwrites the first: it writes beside it, identically (same seed).
  out_dir2 = sample_from_workdir(config, workdir)
  assert out_dir2 == out_dir + "-1"
  with np.load(os.path.join(out_dir2, "samples.npz")) as data:
    np.testing.assert_array_equal(data["arr_0"], images)


def test_sample_given_labels(trained):
  workdir, _, _ = trained
  config = tiny_config(**{"sample.num": 5, "sample.labels": (7, 3), "sample.seed": 3})
  out_dir = sample_from_workdir(config, workdir)
  with np.load(os.path.join(out_dir, "samples.npz")) as data:
    np.testing.assert_array_equal(data["arr_1"], [7, 3, 7, 3, 7])


def _leaves(state):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(
      (state.params, state.ema_params, state.opt_state, state.step))]


def test_exact_resume_is_bit_identical(trained, tmp_path):
  """6 steps straight == 3 steps, process stops, a new process resumes to 6."""
  _, _, straight = trained
  workdir = str(tmp_path / "resume")
  first = train_and_evaluate(tiny_config(max_steps_per_run=3), workdir)
  assert int(first.step) == 3
  # Batch of 16 from 4,500 images: step 3 is mid-epoch; the data iterator resumes there.
  result = run_cli(f"--config=configs/quickstart.py:tiny", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "starting at step 3 of 6" in result.stdout
  resumed = sample_state(workdir)
  for a, b in zip(_leaves(straight), _leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def sample_state(workdir):
  """Restores the latest full TrainState of a tiny run."""
  from ldm_jax.models import build_model
  from ldm_jax.training import sharding
  from ldm_jax.training.checkpoint import Checkpointer
  from ldm_jax.training.optimizer import make_optimizer
  from ldm_jax.training.train_state import create_state
  config = tiny_config()
  mesh = sharding.make_mesh(config.mesh)
  model = build_model(config.model, input_size=28, in_channels=1, num_classes=10)
  tx = make_optimizer(config.optim, config.num_train_steps)
  with jax.set_mesh(mesh):
    abstract, _ = create_state(model, tx, config.data, config.seed, mesh,
                               sharding.logical_rules(config.mesh, mesh), materialize=False)
    return Checkpointer(workdir, read_only=True).restore(abstract)


def test_dit_with_gaussian_v_prediction_trains_and_samples(tmp_path):
  """The same loop with the other denoiser and process: DiT, v-prediction, DDIM + CFG."""
  config = tiny_config(**{"model.name": "dit", "model.variant": "DiT-tiny/2",
                          "diffusion.process": "gaussian", "diffusion.prediction": "v",
                          "sample.sampler": "ddim", "sample.num_steps": 4,
                          "sample.guidance_scale": 2.0, "sample.num": 4})
  config.model.learn_sigma = True  # the ε/v head is guided, the variance head rides along
  state = train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == config.num_train_steps
  out_dir = sample_from_workdir(config, str(tmp_path))
  with np.load(os.path.join(out_dir, "samples.npz")) as data:
    assert data["arr_0"].shape == (4, 28, 28, 1) and data["arr_0"].std() > 0


def test_divergence_stops_before_writing_a_nan_checkpoint(tmp_path):
  from ldm_jax.errors import UserError
  config = tiny_config(**{"optim.learning_rate": 1e30, "optim.grad_clip": 0.0,
                          "optim.warmup_steps": 1, "log_every_steps": 100})
  with pytest.raises(UserError, match="training diverged at step 3"):
    train_and_evaluate(config, str(tmp_path))
  assert not os.listdir(os.path.join(tmp_path, "checkpoints"))  # nothing saved
