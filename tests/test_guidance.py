"""Guidance: classifier-free guidance with rescale and interval, classifier guidance
(cond_fn gradients, the classify training task, guided sampling from the CLI and its
errors)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion.classifier_guidance import make_cond_fn
from ldm_jax.diffusion.guidance import guided_model_fn, rescale_guided
from tests.helpers import REPO, read_events, run_cli, tree_snapshot

CONFIG = os.path.join(REPO, "configs", "classifier_guidance.py")


def cg_config(preset="tiny", **overrides):
  """A configs/classifier_guidance.py preset with dotted-key overrides."""
  from tests.helpers import load_config
  return load_config("configs/classifier_guidance.py", preset, **overrides)


# -- classifier-free guidance --------------------------------------------------
NULL = 10


def toy_apply(x, t, y):
  """Output depends on the label (null: 0) and on time; counts calls via shape."""
  scale = jnp.where(y == NULL, 0.0, y.astype(jnp.float32) + 1.0)
  return x * scale[:, None, None, None] + 0.01 * t[:, None, None, None]


def test_cfg_scale_numbers_and_learned_sigma_channels():
  x = jnp.arange(2 * 2 * 2 * 4, dtype=jnp.float32).reshape(2, 2, 2, 4) / 10
  t = jnp.array([5.0, 5.0])
  y = jnp.array([1, 2])
  out = guided_model_fn(toy_apply, y, NULL, 3.0, guided_channels=2)(x, t)
  cond, uncond = toy_apply(x, t, y), toy_apply(x, t, jnp.full_like(y, NULL))
  np.testing.assert_allclose(out[..., :2], uncond[..., :2] + 3 * (cond - uncond)[..., :2],
                             rtol=1e-6)
  np.testing.assert_allclose(out[..., 2:], cond[..., 2:], rtol=1e-6)  # Σ channels: cond
  # Hand value: x=0.1 at [0,0,0,1], label 1 -> cond 0.2 + 0.05, uncond 0.05 -> 0.05 + 3·0.2
  assert float(out[0, 0, 0, 1]) == pytest.approx(0.65, rel=1e-6)


def test_rescale_matches_diffusers_rescale_noise_cfg():
  torch = pytest.importorskip("torch")
  from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
  rng = np.random.default_rng(0)
  guided = rng.normal(0, 2.0, (3, 8, 8, 4)).astype(np.float32)
  cond = rng.normal(0.3, 0.7, (3, 8, 8, 4)).astype(np.float32)
  for phi in (0.0, 0.3, 0.7, 1.0):
    ours = np.asarray(rescale_guided(jnp.asarray(guided), jnp.asarray(cond), phi))
    theirs = rescale_noise_cfg(torch.from_numpy(guided), torch.from_numpy(cond), phi).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)
  # φ = 1: the per-example std equals the conditional prediction's.
  full = np.asarray(rescale_guided(jnp.asarray(guided), jnp.asarray(cond), 1.0))
  np.testing.assert_allclose(full.reshape(3, -1).std(1), cond.reshape(3, -1).std(1), rtol=1e-5)


def test_guided_model_fn_rescale_numbers():
  x = jnp.array([1.0, -1.0, 2.0, 0.0]).reshape(1, 2, 2, 1)
  t = jnp.zeros((1,))
  y = jnp.array([1])  # cond = 2x, uncond = 0 -> guided = 4·2x = 8x at s = 4
  out = guided_model_fn(toy_apply, y, NULL, 4.0, 1, rescale=0.5)(x, t)
  # rescaled = 8x · std(2x)/std(8x) = 2x; 0.5·2x + 0.5·8x = 5x
  np.testing.assert_allclose(np.asarray(out).ravel(), 5 * np.asarray(x).ravel(), rtol=1e-6)


def test_guidance_interval_per_example_and_skip():
  x = jnp.ones((3, 2, 2, 1))
  y = jnp.array([1, 1, 1])
  fn = guided_model_fn(toy_apply, y, NULL, 3.0, 1, interval=(100.0, 500.0))
  # cond = 2 + 0.01t, uncond = 0.01t -> guided = 0.01t + 3·2 = 6 + 0.01t
  t = jnp.array([50.0, 100.0, 700.0])
  out = np.asarray(jax.jit(fn)(x, t))[:, 0, 0, 0]
  np.testing.assert_allclose(out, [2.5, 7.0, 9.0], rtol=1e-6)
  # Whole batch outside: the cond-only branch of the lax.cond gives the same values.
  out = np.asarray(jax.jit(fn)(x, jnp.full((3,), 900.0)))[:, 0, 0, 0]
  np.testing.assert_allclose(out, [11.0] * 3, rtol=1e-6)
  # ...and runs one forward of batch 3, not 6 (the guided branch doubles it).
  shapes = []

  def counting_apply(x, t, y):
    shapes.append(x.shape[0])
    return toy_apply(x, t, y)
  jaxpr = jax.make_jaxpr(guided_model_fn(counting_apply, y, NULL, 3.0, 1,
                                         interval=(100.0, 500.0)))(x, t)
  assert "cond" in str(jaxpr) and sorted(shapes) == [3, 6]


# -- classifier guidance: cond_fn ------------------------------------------------
def test_cond_fn_matches_analytic_and_finite_differences():
  from ldm_jax.models import build_model
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(2 * 2 * 1, 3)), jnp.float32)

  def linear(x, t):
    return x.reshape(x.shape[0], -1) @ w + 0.001 * t[:, None]
  x = jnp.asarray(rng.normal(size=(4, 2, 2, 1)), jnp.float32)
  t = jnp.full((4,), 10.0)
  labels = jnp.array([0, 2, 1, 2])
  g = np.asarray(make_cond_fn(linear, labels, 2.5)(x, t)).reshape(4, -1)
  p = np.asarray(jax.nn.softmax(linear(x, t)))
  expected = 2.5 * (np.asarray(w).T[np.asarray(labels)] - p @ np.asarray(w).T)
  np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-6)

  # The tiny noisy classifier: central differences on a few pixels of each example.
  config = cg_config("tiny-classifier")
  model = build_model(config.model, input_size=28, in_channels=1, num_classes=10)
  x = jnp.asarray(rng.normal(size=(2, 28, 28, 1)), jnp.float32)
  t = jnp.array([300.0, 700.0])
  # Random (not zero-initialised) weights everywhere; jitted, as op-by-op init is slow.
  params = jax.jit(lambda k: jax.tree_util.tree_map(
      lambda a: a + 0.05 * jax.random.normal(jax.random.fold_in(k, a.size), a.shape),
      model.init(k, x, t)["params"]))(jax.random.key(1))
  labels = jnp.array([3, 7])
  apply = lambda xx, tt: model.apply({"params": params}, xx, tt)
  g = np.asarray(jax.jit(make_cond_fn(apply, labels, 1.0))(x, t))
  log_softmax = jax.jit(lambda xx: jax.nn.log_softmax(apply(xx, t)))

  def log_p(xx):
    return np.asarray(log_softmax(xx))[np.arange(2), np.asarray(labels)]
  eps = 1e-2
  for (i, j) in [(3, 4), (14, 14), (20, 9)]:
    bump = np.zeros(x.shape, np.float32)
    bump[:, i, j, 0] = eps
    fd = (log_p(x + bump) - log_p(x - bump)) / (2 * eps)  # both examples at once
    np.testing.assert_allclose(g[:, i, j, 0], fd, rtol=2e-2, atol=2e-4)
  assert np.abs(g).max() > 1e-4


# -- the classify task, and guided sampling through the CLI -------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A tiny unconditional denoiser and a tiny classifier on the same process."""
  from ldm_jax.train import train_and_evaluate
  root = tmp_path_factory.mktemp("cg")
  denoiser, classifier = str(root / "denoiser"), str(root / "classifier")
  train_and_evaluate(cg_config("tiny"), denoiser)
  state = train_and_evaluate(cg_config("tiny-classifier"), classifier)
  return denoiser, classifier, state


def test_classify_task_trains_and_reports_accuracy(runs):
  _, classifier, state = runs
  assert int(state.step) == 6
  events = read_events(os.path.join(classifier, "tensorboard"))
  scalars = {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value
             if v.HasField("simple_value")}
  assert {("loss", 6), ("accuracy", 6), ("eval/accuracy_t0", 6), ("eval/accuracy_t999", 6)} \
      <= set(scalars)
  assert all(np.isfinite(v) for v in scalars.values())
  assert 0.0 <= scalars[("accuracy", 6)] <= 1.0
  assert scalars[("loss", 2)] == pytest.approx(np.log(10), rel=0.3)  # ~uniform at the start
  with open(os.path.join(classifier, "classifier_eval.json")) as f:
    report = json.load(f)
  assert set(report["heldout_accuracy_by_timestep"]) == {"0", "999"}
  assert not os.path.exists(os.path.join(classifier, "grids"))  # no sampling for a classifier
  with open(os.path.join(classifier, "config.json")) as f:
    assert json.load(f)["task"] == "classify"


def test_guided_sampling_cli_end_to_end(runs):
  denoiser, classifier, _ = runs
  result = run_cli(f"--config={CONFIG}:tiny", f"--workdir={denoiser}", "--mode=sample",
                   f"--config.sample.classifier_workdir={classifier}",
                   "--config.sample.classifier_scale=4", "--config.sample.num=6",
                   "--config.sample.batch_size=6")
  assert result.returncode == 0, result.stderr[-3000:]
  out = os.path.join(denoiser, "samples", "step6_ddim3_cfg1_cg4_seed0")
  with np.load(os.path.join(out, "samples.npz")) as data:
    assert data["arr_0"].shape == (6, 28, 28, 1)
    np.testing.assert_array_equal(data["arr_1"], [0, 1, 2, 3, 4, 5])
  assert "classifier guidance" in result.stdout + result.stderr


def test_guidance_changes_samples(runs):
  """s > 0 moves the samples; s = 0 equals plain unconditional sampling."""
  from ldm_jax.sample import sample_from_workdir
  denoiser, classifier, _ = runs
  common = {"sample.num": 4, "sample.batch_size": 4}
  plain = sample_from_workdir(cg_config("tiny", **common), denoiser)
  zero = sample_from_workdir(cg_config("tiny", **common, **{
      "sample.classifier_workdir": classifier, "sample.classifier_scale": 0.0}), denoiser)
  big = sample_from_workdir(cg_config("tiny", **common, **{
      "sample.classifier_workdir": classifier, "sample.classifier_scale": 50.0}), denoiser)
  load = lambda d: np.load(os.path.join(d, "samples.npz"))["arr_0"].astype(int)
  np.testing.assert_array_equal(load(plain), load(zero))
  assert np.abs(load(big) - load(plain)).max() > 0


def _mismatched_process(classifier, tmp_path):
  bad = str(tmp_path / "cosine_classifier")
  shutil.copytree(classifier, bad)
  with open(os.path.join(bad, "config.json")) as f:
    saved = json.load(f)
  saved["diffusion"]["beta_schedule"] = "cosine"
  with open(os.path.join(bad, "config.json"), "w") as f:
    json.dump(saved, f)
  return [f"--config.sample.classifier_workdir={bad}"]


@pytest.mark.parametrize("case, needle", [
    ("missing", "does not exist"),
    ("task", "task='denoise' run"),
    ("process", "different diffusion process"),
    ("flow", "needs diffusion.process='gaussian'"),
    ("euler", "needs sample.sampler in"),
])
def test_guided_sampling_errors(runs, tmp_path, case, needle):
  denoiser, classifier, _ = runs
  args = [f"--config={CONFIG}:tiny", f"--workdir={denoiser}", "--mode=sample",
          "--config.sample.classifier_scale=1"]
  if case == "missing":
    args.append(f"--config.sample.classifier_workdir={tmp_path / 'nope'}")
  elif case == "task":
    args.append(f"--config.sample.classifier_workdir={denoiser}")
  elif case == "process":
    args += _mismatched_process(classifier, tmp_path)
  else:
    args.append(f"--config.sample.classifier_workdir={classifier}")
    args.append("--config.diffusion.process=flow" if case == "flow"
                else "--config.sample.sampler=euler")
  result = run_cli(*args)
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
  assert needle in errors[0], errors[0]
  assert "Traceback" not in result.stderr


def test_resume_with_another_task_is_refused(runs):
  denoiser, _, _ = runs
  result = run_cli(f"--config={CONFIG}:tiny-classifier", f"--workdir={denoiser}")
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
  assert "task: saved 'denoise' vs given 'classify'" in errors[0]


def test_saved_config_without_task_is_a_denoiser():
  from ldm_jax import run_config
  config = cg_config("tiny")
  saved = run_config.config_to_dict(config)
  del saved["task"]
  assert run_config.incompatible_keys(saved, config) == []
  assert run_config.incompatible_keys(saved, cg_config("tiny-classifier"))[0] == "task"  # first


@pytest.mark.parametrize("mode", ["sample", "bpd"])
def test_inference_modes_refuse_a_classifier_run(runs, mode):
  _, classifier, _ = runs
  before = tree_snapshot(classifier)
  result = run_cli(f"--config={CONFIG}:tiny-classifier", f"--workdir={classifier}",
                   f"--mode={mode}", "--config.eval.bpd_batch_size=28")
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
  assert f"--mode={mode} needs a denoiser run" in errors[0]
  assert tree_snapshot(classifier) == before
