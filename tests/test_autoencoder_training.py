"""The autoencode task: the one-VJP generator gradient equals a brute-force
formulation of LDM's loss (adaptive weight from separate last-layer gradients), the
discriminator step, the EMA codebook, and end-to-end runs through train_and_evaluate,
the latent cache command and a denoiser trained on the cache."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ldm_jax.errors import UserError
from ldm_jax.losses import gan, lpips
from ldm_jax.models import vae as vae_lib
from ldm_jax.training import autoencoder as ae
from ldm_jax.training.train_state import TrainState
from tests.helpers import load_config

SIZE, BATCH = 16, 4


def _config(preset="tiny", **overrides):
  return load_config("configs/vae_mnist.py", preset,
                     **{"data.image_size": SIZE, "data.channels": 3, **overrides})


def _sgd_tx(ema_codebook=False):
  """Plain SGD with rate 1 on both networks: an update is minus the gradient."""
  return optax.multi_transform(
      {"autoencoder": optax.sgd(1.0), "discriminator": optax.sgd(1.0),
       "frozen": optax.set_to_zero()},
      lambda p: ae.param_labels(p, ema_codebook))


def _state(model, tx, step, seed=0):
  x = jnp.zeros((1, SIZE, SIZE, 3))
  params = nn.unbox(model.init(jax.random.key(seed), x)["params"])
  return TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=params, rng=jax.random.key(seed + 1))


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8),
          "label": np.zeros((BATCH,), np.int32)}


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _tree_rel(a, b):
  """max over leaves of max|a - b| / max(max|b|, 1e-3 * the largest |b| of the tree): a
  leaf whose true gradient is zero (attention key biases: softmax ignores a constant
  shift) compares at the tree's scale, not at its own round-off."""
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  floor = 1e-3 * max(float(np.max(np.abs(y))) for y in leaves_b)
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             / max(float(np.max(np.abs(y))), floor) for x, y in zip(leaves_a, leaves_b))


def _reference_grads(model, loss, state, batch, frozen):
  """LDM's loss written directly: jax.grad of the whole generator loss, with the
  adaptive weight from two separate full gradients at the decoder's last kernel (one
  jitted program: one compilation)."""
  factor = loss.disc_factor if int(state.step) >= loss.disc_start else 0.0
  reg_w = loss.kl_weight if model.kind == "kl" else loss.codebook_weight

  @jax.jit
  def reference(state, batch, frozen):
    x = batch["image"].astype(jnp.float32) / 127.5 - 1.0
    key = jax.random.fold_in(state.rng, state.step)
    d_params = state.params["discriminator"]

    def parts(ae_params):
      p = {"autoencoder": ae_params, "discriminator": d_params}
      recon, reg = model.apply({"params": p}, x, key, method=ae.AutoencoderGAN.reconstruct)
      rec = jnp.abs(x - recon) if loss.pixel == "l1" else (x - recon) ** 2
      if "lpips" in frozen:
        rec = rec + loss.perceptual_weight * lpips.LPIPS().apply(
            {"params": frozen["lpips"]}, x, recon)[:, None, None, None]
      rec = rec / np.exp(loss.logvar) + loss.logvar
      nll = jnp.sum(rec) / x.shape[0] if loss.reduction == "sum" else jnp.mean(rec)
      reg_loss = jnp.mean(reg.kl()) if model.kind == "kl" else reg.loss
      g = -jnp.mean(model.apply({"params": p}, recon, method=ae.AutoencoderGAN.discriminate))
      return nll, reg_loss, g, recon

    last = lambda tree: tree["decoder"]["conv_out"]["kernel"]  # noqa: E731
    g_nll = last(jax.grad(lambda p: parts(p)[0])(state.params["autoencoder"]))
    g_gan = last(jax.grad(lambda p: parts(p)[2])(state.params["autoencoder"]))
    weight = loss.disc_weight * jnp.clip(
        jnp.linalg.norm(g_nll) / (jnp.linalg.norm(g_gan) + 1e-4), 0.0, 1e4)

    def total(p):
      nll, reg_loss, g, _ = parts(p)
      return nll + reg_w * reg_loss + weight * factor * g
    ae_grads = jax.grad(total)(state.params["autoencoder"])
    recon = jax.lax.stop_gradient(parts(state.params["autoencoder"])[3])

    def d_total(dp):
      real = model.apply({"params": {"discriminator": dp}}, x,
                         method=ae.AutoencoderGAN.discriminate)
      fake = model.apply({"params": {"discriminator": dp}}, recon,
                         method=ae.AutoencoderGAN.discriminate)
      return factor * gan.D_LOSSES[loss.disc_loss](real, fake)
    return ae_grads, jax.grad(d_total)(d_params), weight

  ae_grads, d_grads, weight = reference(state, batch, frozen)
  return ae_grads, d_grads, float(weight)


@pytest.mark.parametrize("preset,with_lpips,options", [
    ("tiny", True, {"loss.pixel": "l2", "loss.logvar": 0.3, "loss.disc_loss": "vanilla"}),
    ("tiny_vq", False, {})])
def test_one_vjp_step_equals_brute_force_ldm_loss(preset, with_lpips, options):
  """After the discriminator starts: the generator's gradient (one backward pass) and
  the discriminator's equal jax.grad of LDM's loss with the adaptive weight computed
  from two separate full backward passes (≤ 3e-5 relative, float32)."""
  config = _config(preset, **{"loss.disc_start": 2, "loss.kl_weight": 1e-2, **options})
  model = ae.build_autoencoder_gan(config)
  loss = ae.LossConfig.from_config(config.loss)
  tx = _sgd_tx()
  state = _state(model, tx, step=5)
  frozen = {}
  if with_lpips:
    image = jnp.zeros((1, SIZE, SIZE, 3))
    frozen = {"lpips": nn.unbox(lpips.LPIPS().init(jax.random.key(3), image, image)["params"])}
  step = jax.jit(ae.make_autoencoder_step(model, tx, loss, ema=0.0, ema_warmup=False))
  batch = _batch()
  new_state, metrics = step(state, batch, frozen)
  grads = jax.tree_util.tree_map(lambda a, b: a - b, state.params, new_state.params)
  ref_ae, ref_d, ref_weight = _reference_grads(model, loss, state, batch, frozen)
  assert float(metrics["disc_factor"]) == 1.0 and float(metrics["d_loss"]) > 0
  assert abs(float(metrics["d_weight"]) - ref_weight) <= 1e-5 * ref_weight
  # Two float32 programs summing in different orders (one fused step, one reference):
  # measured ≤ 1.2e-5 at the tree's scale.
  assert _tree_rel(grads["autoencoder"], ref_ae) < 3e-5
  # Batch-norm scale gradients sum many terms of both signs: 5e-5 (measured 1.4e-5).
  assert _tree_rel(grads["discriminator"], ref_d) < 5e-5
  if with_lpips:
    assert float(metrics["lpips"]) > 0


def test_before_disc_start_no_gan_and_a_still_discriminator():
  config = _config("tiny", **{"loss.disc_start": 100})
  model = ae.build_autoencoder_gan(config)
  tx = _sgd_tx()
  state = _state(model, tx, step=0)
  step = jax.jit(ae.make_autoencoder_step(model, tx, ae.LossConfig.from_config(config.loss),
                                          ema=0.0, ema_warmup=False))
  new_state, metrics = step(state, _batch(), {})
  assert float(metrics["disc_factor"]) == 0.0 and float(metrics["d_loss"]) == 0.0
  # Not computed at all before disc_start (lax.cond): D's outputs and λ read 0.
  assert float(metrics["d_weight"]) == float(metrics["g_loss"]) == 0.0
  assert float(metrics["logits_real"]) == float(metrics["grad_norm_disc"]) == 0.0
  for a, b in zip(jax.tree_util.tree_leaves(state.params["discriminator"]),
                  jax.tree_util.tree_leaves(new_state.params["discriminator"])):
    np.testing.assert_array_equal(a, b)
  ref_ae, _, _ = _reference_grads(model, ae.LossConfig.from_config(config.loss), state, _batch(), {})
  grads = jax.tree_util.tree_map(lambda a, b: a - b, state.params["autoencoder"],
                                 new_state.params["autoencoder"])
  assert _tree_rel(grads, ref_ae) < 1e-5


def test_ema_codebook_moves_by_moving_averages_not_gradients():
  config = _config("tiny_vq", **{"model.codebook_update": "ema", "loss.disc_start": 100,
                                 "loss.ema_codebook_decay": 0.9})
  model = ae.build_autoencoder_gan(config)
  tx = _sgd_tx(ema_codebook=True)
  state = _state(model, tx, step=0)
  q = state.params["autoencoder"]["quantize"]
  np.testing.assert_allclose(q["ema_embed_sum"], q["embedding"])  # "one latent per code"
  step = jax.jit(ae.make_autoencoder_step(model, tx, ae.LossConfig.from_config(config.loss),
                                          ema=0.0, ema_warmup=False))
  batch = _batch()
  new_state, _ = step(state, batch, {})
  # The batch's assignments, recomputed: counts and sums of the pre-quantisation latents.
  x = batch["image"].astype(jnp.float32) / 127.5 - 1.0
  z = model.apply({"params": state.params}, x, method=lambda m, x: m.autoencoder.encode(x))
  out = model.apply({"params": state.params}, z,
                    method=lambda m, z: m.autoencoder.quantize(z))
  flat = np.asarray(z).reshape(-1, z.shape[-1])
  idx = np.asarray(out.indices).reshape(-1)
  k = q["embedding"].shape[0]
  counts = np.bincount(idx, minlength=k).astype(np.float64)
  sums = np.zeros((k, flat.shape[1]))
  np.add.at(sums, idx, flat)
  size = 0.9 * np.asarray(q["ema_cluster_size"]) + 0.1 * counts
  embed_sum = 0.9 * np.asarray(q["ema_embed_sum"]) + 0.1 * sums
  smoothed = (size + 1e-5) / (size.sum() + k * 1e-5) * size.sum()
  new_q = new_state.params["autoencoder"]["quantize"]
  np.testing.assert_allclose(new_q["ema_cluster_size"], size, rtol=1e-5)
  np.testing.assert_allclose(new_q["embedding"], embed_sum / smoothed[:, None], rtol=1e-4, atol=1e-6)
  assert counts.max() > 1  # several positions share codes: the update is not trivial


def test_bad_autoencoder_inputs_are_clear_errors():
  config = _config("tiny")
  config.data.image_size = 15  # tiny-kl has f = 2
  with pytest.raises(UserError, match="not a multiple of the autoencoder's downsampling"):
    ae.build_autoencoder_gan(config)
  model = vae_lib.build(load_config("configs/vae_mnist.py", "").model, in_channels=1,
                        out_channels=1)
  with pytest.raises(UserError, match="not a multiple of the downsampling factor 4"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 30, 30, 1)))
  with pytest.raises(UserError, match="unknown loss.disc_loss"):
    ae.LossConfig.from_config(_config("tiny", **{"loss.disc_loss": "wgan"}).loss)
  with pytest.raises(UserError, match="codebook_update"):
    jax.eval_shape(vae_lib.VectorQuantizer(8, 3, codebook_update="kmeans").init,
                   jax.random.key(0), jnp.zeros((1, 2, 2, 3)))


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
  """A tiny KL autoencoder trained on built-in MNIST through train_and_evaluate."""
  from ldm_jax.train import train_and_evaluate
  workdir = str(tmp_path_factory.mktemp("vae") / "run")
  config = load_config("configs/vae_mnist.py", "tiny")
  config.max_steps_per_run = 3  # stops with a checkpoint at step 3 ...
  train_and_evaluate(config, workdir)
  config.max_steps_per_run = 0  # ... and resumes (both optimizers' states) to step 6
  train_and_evaluate(config, workdir)
  return workdir, config


def test_autoencode_run_reports_reconstruction_quality(vae_run):
  """reconstruction_eval.json holds the trained (and once resumed) weights' held-out
  quality, which beats the initial weights' (the same images, the same metric code)."""
  from ldm_jax.train import eval_images
  from ldm_jax.training.setup import build_training
  workdir, config = vae_run
  with open(os.path.join(workdir, "reconstruction_eval.json")) as f:
    report = json.load(f)
  assert report["step"] == 6 and report["num_images"] == 40
  setup = build_training(config)
  untrained, _ = ae.reconstruction_metrics(setup.model, setup.init_state().params, {},
                                           eval_images(config))
  # (6 steps: PSNR rises by ~4 dB; SSIM of such blurs is not yet meaningful, only bounded)
  assert report["psnr"] > untrained["psnr"] + 1.0 and -1.0 <= report["ssim"] <= 1.0
  assert "lpips" not in report  # no weights given: not reported (and said so in the log)
  assert os.path.isfile(os.path.join(workdir, "grids", "reconstructions_0000006.png"))


def test_latent_cache_feeds_a_denoiser_and_decodes_its_samples(vae_run, tmp_path):
  """cache_latents with the trained autoencoder -> a DiT trained on the cache ->
  samples decoded by the autoencoder; and the errors a user can cause."""
  from ldm_jax.data.latents import read_manifest
  from ldm_jax.first_stage import cache_latents, decoder_for, load_first_stage
  from ldm_jax.train import train_and_evaluate
  workdir, vae_config = vae_run
  cache = str(tmp_path / "cache")
  vae_config = vae_config.copy_and_resolve_references()
  vae_config.cache = {"split": "heldout", "batch_size": 64, "scale": "auto"}
  manifest = cache_latents(vae_config, workdir, cache)
  assert manifest["num_examples"] == 500 and manifest["latent_shape"] == [14, 14, 4]
  assert manifest["store"] == "mean_std"
  scale = manifest["vae"]["scaling_factor"]  # LDM's scale_by_std: 1 / std of batch 1's z
  with pytest.raises(UserError, match="already holds a latent cache"):
    cache_latents(vae_config, workdir, cache)
  # The cached means are the autoencoder's posterior means of those images.
  stage = load_first_stage(workdir)
  from ldm_jax.data.builtin import load_mnist
  from ldm_jax.data.latents import LatentCacheSource
  images, labels = load_mnist("heldout")
  post = stage.model.apply({"params": stage.params}, images[:3].astype(np.float32) / 127.5 - 1,
                           method=stage.model.encode)
  source = LatentCacheSource(cache)
  for i in range(3):
    np.testing.assert_allclose(source[i]["latent"], post.mean[i] * scale, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(source[i]["latent_std"], post.std[i] * scale, rtol=1e-5)
    assert source[i]["label"] == labels[i]
  first = stage.model.apply({"params": stage.params}, images[:64].astype(np.float32) / 127.5 - 1,
                            method=stage.model.encode).sample(jax.random.key(vae_config.seed))
  assert abs(scale * float(jnp.std(first)) - 1.0) < 1e-5

  ldm = load_config("configs/ldm_mnist.py", "tiny")
  ldm.data.latent_cache, ldm.data.image_size = cache, 14
  ldm.sample.judge = False
  run = str(tmp_path / "ldm")
  train_and_evaluate(ldm, run)
  grids = os.listdir(os.path.join(run, "grids"))
  assert grids and read_manifest(cache)["fingerprint"] == stage.fingerprint
  assert decoder_for(ldm).model.scaling_factor == scale  # decodes with the cache's factor

  bad = ldm.copy_and_resolve_references()
  bad.data.channels = 3
  with pytest.raises(UserError, match="set data.channels=4"):
    train_and_evaluate(bad, str(tmp_path / "bad_channels"))
  # A different autoencoder (one weight changed, as a diffusers folder) cannot decode it.
  from ldm_jax.convert import vae as cvae
  changed = jax.tree_util.tree_map(np.array, stage.params)
  changed["decoder"]["conv_out"]["bias"][0] += 1e-3
  config = {k: v for k, v in stage.config.items() if k not in ("dtype", "attention")}
  cvae.to_diffusers(changed, config, str(tmp_path / "other_vae"))
  bad = ldm.copy_and_resolve_references()
  bad.data.vae = str(tmp_path / "other_vae")
  with pytest.raises(UserError, match="written by a different VAE"):
    decoder_for(bad)
  with pytest.raises(UserError, match="is a task='denoise' run, not an autoencoder"):
    load_first_stage(run)


def test_trained_autoencoder_exports_to_a_folder_diffusers_loads(vae_run, tmp_path):
  """The run's weights -> diffusers AutoencoderKL folder -> the same decode (≤ 1e-5)."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from ldm_jax.first_stage import export_first_stage, load_first_stage
  workdir, _ = vae_run
  folder = export_first_stage(workdir, str(tmp_path / "vae"))
  with pytest.raises(UserError, match="exists; nothing was overwritten"):
    export_first_stage(workdir, folder)
  theirs = diffusers.AutoencoderKL.from_pretrained(folder).eval()
  stage = load_first_stage(workdir)
  z = np.random.default_rng(0).normal(size=(2, 14, 14, 4)).astype(np.float32)
  ours = np.asarray(stage.model.apply({"params": stage.params}, z, method=stage.model.decode))
  with torch.no_grad():
    ref = theirs.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample.numpy()
  assert _rel(ours, ref.transpose(0, 2, 3, 1)) < 1e-5
  ldm_file = export_first_stage(workdir, str(tmp_path / "vae.safetensors"), fmt="ldm")
  assert os.path.getsize(ldm_file) > 0
  # The exported folder is itself a first stage (e.g. data.vae=<folder>): same decode.
  again = load_first_stage(folder)
  np.testing.assert_allclose(
      again.model.apply({"params": again.params}, z, method=again.model.decode), ours,
      rtol=1e-5, atol=1e-6)
  assert again.fingerprint == stage.fingerprint


def test_task_and_model_must_agree():
  from ldm_jax import run_config
  config = load_config("configs/vae_mnist.py", "tiny")
  config.model.name = "dit"
  with pytest.raises(UserError, match="task 'autoencode' trains an autoencoder"):
    run_config.validate(config)
  config = load_config("configs/vae_mnist.py", "tiny")
  config.data.source = "latents"
  with pytest.raises(UserError, match="trains on images"):
    run_config.validate(config)


def test_cli_modes_need_their_paths(tmp_path):
  from tests.helpers import run_cli
  result = run_cli("--config=configs/vae_mnist.py:tiny", f"--workdir={tmp_path}",
                   "--mode=export")
  assert result.returncode == 2 and "--mode=export needs --export=PATH" in result.stderr
  result = run_cli("--config=configs/vae_mnist.py:tiny", f"--workdir={tmp_path}",
                   "--mode=cache_latents")
  assert result.returncode == 2 and "needs --cache_dir=DIR" in result.stderr


def test_autoencode_step_on_8_devices_matches_one_device():
  """Data-parallel over 8 devices (global batch-norm statistics, VQ counts and the
  adaptive weight over the whole batch) = one device; 2 steps, the second with the GAN.
  (The VQ preset: its quantizer and attention level exercise the most; the KL preset
  measured the same, 1.2e-6, in review.)"""
  from tests.mesh_equivalence import fixed_batches, train_steps
  config = load_config("configs/vae_mnist.py", "tiny_vq")
  config.loss.disc_start = 1
  batches = fixed_batches(config, 2)
  one, one_params, _ = train_steps(config, batches, (1, 1, 1), devices=jax.devices()[:1])
  eight, eight_params, _ = train_steps(config, batches, (8, 1, 1))
  assert _rel(eight, one) < 1e-5
  assert _tree_rel(eight_params, one_params) < 1e-5
