"""The "autoencode" task: an LDM first stage (KL or VQ autoencoder) trained with
L1 (or L2) + LPIPS + a PatchGAN, as LDM's `LPIPSWithDiscriminator` /
`VQLPIPSWithDiscriminator` (Rombach et al. 2022, Esser et al. 2021).

One jitted step updates both networks, each with its own optimizer (an
`optax.multi_transform` over the two halves of the parameters):

  generator  L = NLL + w_reg R + lambda * f(step) * G
             NLL = sum_pixels(|x - x^| + w_p LPIPS(x, x^)) / exp(s) + s, summed per image and
                   averaged over the batch (kl: LDM's "sum" reduction) or averaged over
                   pixels too (vq: "mean"); s = loss.logvar (fixed, as in LDM where it is
                   not in the optimizer)
             R     KL(q(z|x) || N(0, I)) summed per image, batch mean (kl, w_reg = kl_weight)
                   or the quantizer's codebook + beta commitment loss (vq, codebook_weight)
             G     -mean D(x^)
             lambda = disc_weight * ||dNLL/dW|| / (||dG/dW|| + 1e-4), clipped to [0, 1e4],
                   W the decoder's last conv kernel (adaptive weight, Esser et al. eq. 7)
             f     disc_factor from loss.disc_start on, 0 before
  discriminator  f(step) * {hinge | vanilla}(D(x), D(sg x^))

The gradient is assembled from one autoencoder forward and ONE backward pass: the
cotangent on the reconstruction dNLL/dx^ + lambda f dG/dx^ (each from a backward
through LPIPS / D only) goes through the autoencoder's VJP together with w_reg on
the regulariser. The two last-layer gradients lambda needs come from the decoder's
last conv input (sown as an intermediate), not from extra backward passes. The
discriminator sees the reconstruction made before this step's generator update
(LDM's alternating optimizers re-run the generator after its update; the difference
is one step of staleness in D's fake batch). Before disc_start, where f = 0, the GAN
terms are not computed at all (a lax.cond): the step does not run the discriminator,
and lambda, G, the discriminator's loss, logits and gradients read 0.

Parameters are {"autoencoder": ..., "discriminator": ...}; frozen LPIPS weights come
in as the step's third argument (never checkpointed, never trained).
"""

import dataclasses
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldm_jax.errors import check
from ldm_jax.losses import gan
from ldm_jax.models import vae as vae_lib
from ldm_jax.training.ema import ema_decay, ema_update
from ldm_jax.training.train_state import TrainState

logger = logging.getLogger("ldm_jax")

PIXEL_LOSSES = ("l1", "l2")
REDUCTIONS = ("sum", "mean")


class AutoencoderGAN(nn.Module):
  """The trained pair: an autoencoder (`AutoencoderKL` / `VQModel`) and its PatchGAN.
  Parameters live under "autoencoder" and "discriminator"."""
  autoencoder: nn.Module
  discriminator: nn.Module

  @property
  def kind(self) -> str:
    return "vq" if isinstance(self.autoencoder, vae_lib.VQModel) else "kl"

  def reconstruct(self, x: jax.Array, key: jax.Array | None = None,
                  sample_posterior: bool = True):
    """(reconstruction, regulariser): KL-posterior (DiagonalGaussian) or VQOutput."""
    if self.kind == "vq":
      return self.autoencoder(x)
    return self.autoencoder(x, sample_posterior=sample_posterior and key is not None, key=key)

  def discriminate(self, x: jax.Array) -> jax.Array:
    return self.discriminator(x)

  def __call__(self, x: jax.Array):  # for init: touches both networks
    recon, _ = self.reconstruct(x)
    return recon, self.discriminator(recon)


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """`config.loss` of an autoencode run (defaults: LDM's kl-f* configs)."""
  pixel: str = "l1"
  perceptual_weight: float = 1.0
  logvar: float = 0.0
  reduction: str = "sum"
  kl_weight: float = 1e-6
  codebook_weight: float = 1.0
  disc_start: int = 50001
  disc_weight: float = 0.5
  disc_factor: float = 1.0
  disc_loss: str = "hinge"
  ema_codebook_decay: float = 0.99

  @classmethod
  def from_config(cls, loss_config) -> "LossConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in loss_config.items() if k in fields}
    out = cls(**values)
    check(out.pixel in PIXEL_LOSSES,
          f"unknown loss.pixel {out.pixel!r}; valid: {list(PIXEL_LOSSES)}")
    check(out.reduction in REDUCTIONS,
          f"unknown loss.reduction {out.reduction!r}; valid: {list(REDUCTIONS)}")
    check(out.disc_loss in gan.D_LOSSES,
          f"unknown loss.disc_loss {out.disc_loss!r}; valid: {sorted(gan.D_LOSSES)}")
    for name in ("perceptual_weight", "kl_weight", "codebook_weight", "disc_weight",
                 "disc_factor"):
      check(getattr(out, name) >= 0, f"loss.{name} must be >= 0, got {getattr(out, name)}")
    check(0.0 < out.ema_codebook_decay < 1.0,
          f"loss.ema_codebook_decay must be in (0, 1), got {out.ema_codebook_decay}")
    return out


def build_autoencoder_gan(config) -> AutoencoderGAN:
  """The autoencoder named by config.model (channels from config.data) and the
  PatchGAN of config.loss (disc_layers, disc_channels, disc_norm)."""
  from ldm_jax.models.registry import build_model
  data = config.data
  autoencoder = build_model(config.model, in_channels=data.channels, out_channels=data.channels)
  factor = autoencoder.downsampling_factor
  check(data.image_size % factor == 0,
        f"data.image_size={data.image_size} is not a multiple of the autoencoder's "
        f"downsampling factor f={factor} (model.variant={config.model.variant!r}); use an "
        f"image size divisible by {factor}")
  loss = config.loss
  discriminator = gan.NLayerDiscriminator(ndf=int(loss.get("disc_channels", 64)),
                                          n_layers=int(loss.get("disc_layers", 3)),
                                          norm=loss.get("disc_norm", "batch"))
  return AutoencoderGAN(autoencoder, discriminator)


# -- frozen perceptual network --------------------------------------------------------

def lpips_files(loss_config) -> tuple[str, str] | None:
  """(vgg_path, heads_path) of config.loss, or None when LPIPS is off. The heads
  default to the copy inside an installed `lpips` package."""
  from ldm_jax.losses import lpips
  vgg = loss_config.get("lpips_vgg", "")
  if not vgg or float(loss_config.get("perceptual_weight", 1.0)) == 0.0:
    return None
  heads = loss_config.get("lpips_heads", "") or lpips.lpips_heads_path()
  check(bool(heads), "loss.lpips_vgg is set but no LPIPS heads file: set loss.lpips_heads to "
        "the lpips package's weights/v0.1/vgg.pth (or pip install --no-deps lpips==0.1.4)")
  return vgg, heads


def load_frozen(loss_config) -> dict:
  """The frozen networks the step reads: {"lpips": params} or {} (saying once that the
  run trains without a perceptual loss)."""
  files = lpips_files(loss_config)
  if files is None:
    if float(loss_config.get("perceptual_weight", 1.0)) > 0:
      logger.warning("no LPIPS weights given (loss.lpips_vgg is empty): training WITHOUT the "
                     "perceptual loss and without the LPIPS metric. Set loss.lpips_vgg to a "
                     "local torchvision VGG16 file (vgg16-397923af.pth) to use it.")
    return {}
  from ldm_jax.losses import lpips
  return {"lpips": lpips.load_lpips_params(*files)}


def frozen_struct(loss_config) -> dict:
  """Shapes of `load_frozen`'s result without reading files (ahead-of-time compile)."""
  if lpips_files(loss_config) is None:
    return {}
  from ldm_jax.losses import lpips
  image = jnp.zeros((1, 64, 64, 3), jnp.float32)
  shapes = jax.eval_shape(lambda: lpips.LPIPS().init(jax.random.key(0), image, image))
  return {"lpips": nn.unbox(shapes["params"])}


def lpips_distance(frozen: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  """Per-example LPIPS (B,) with the frozen weights (zeros when there are none)."""
  if "lpips" not in frozen:
    return jnp.zeros((x.shape[0],), jnp.float32)
  from ldm_jax.losses import lpips
  return lpips.LPIPS().apply({"params": frozen["lpips"]}, x, y)


# -- optimizer ----------------------------------------------------------------------------

def param_labels(params, ema_codebook: bool) -> Any:
  """"autoencoder" / "discriminator" per leaf; "frozen" for an EMA codebook (its
  averages and the codebook itself move by `ema_codebook_update`, not gradients)."""
  def label(path, _):
    names = [getattr(k, "key", str(k)) for k in path]
    if ema_codebook and "quantize" in names:
      return "frozen"
    return names[0]
  return jax.tree_util.tree_map_with_path(label, params)


def make_autoencoder_optimizer(config, ema_codebook: bool) -> optax.GradientTransformation:
  """Each network its own optimizer: config.optim (autoencoder), config.disc_optim."""
  from ldm_jax.training.optimizer import make_optimizer
  steps = config.num_train_steps
  return optax.multi_transform(
      {"autoencoder": make_optimizer(config.optim, steps),
       "discriminator": make_optimizer(config.disc_optim, steps),
       "frozen": optax.set_to_zero()},
      lambda params: param_labels(params, ema_codebook))


def uses_ema_codebook(model: AutoencoderGAN) -> bool:
  return model.kind == "vq" and model.autoencoder.codebook_update == "ema"


# -- the step -----------------------------------------------------------------------------

def _last_layer_grad(h: jax.Array, kernel: jax.Array, cotangent: jax.Array) -> jax.Array:
  """d<cotangent, conv(h, kernel)>/d kernel: the decoder's last 3x3 SAME conv."""
  def conv_out(k):
    return jax.lax.conv_general_dilated(h, k.astype(h.dtype), (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  _, vjp = jax.vjp(conv_out, kernel)
  return vjp(cotangent.astype(h.dtype))[0]


def _pixel_loss(kind: str, x, recon):
  diff = x - recon
  return jnp.abs(diff) if kind == "l1" else diff * diff


def make_autoencoder_step(model: AutoencoderGAN, tx, loss: LossConfig, ema: float,
                          ema_warmup: bool, lr_schedule=None, nan_policy: str = "stop"):
  """Builds `train_step(state, batch, frozen) -> (state, metrics)` (see module doc)."""
  kind = model.kind
  ema_codebook = uses_ema_codebook(model)
  disc_loss_fn = gan.D_LOSSES[loss.disc_loss]

  def train_step(state: TrainState, batch, frozen):
    from ldm_jax.training.step import to_model_range
    key = jax.random.fold_in(state.rng, state.step)
    x = to_model_range(batch["image"])
    params = state.params
    d_params = params["discriminator"]

    # Autoencoder forward with its VJP; the last conv's input comes out as aux.
    def forward(ae_params):
      (recon, reg), inter = model.apply(
          {"params": {"autoencoder": ae_params, "discriminator": d_params}}, x, key,
          method=AutoencoderGAN.reconstruct, mutable=["intermediates"])
      h = inter["intermediates"]["autoencoder"]["decoder"]["conv_out_input"][0]
      if kind == "kl":
        reg_loss = jnp.mean(reg.kl())
        aux = {"kl": reg_loss, "posterior_std": jnp.mean(reg.std)}
      else:
        reg_loss = reg.loss
        aux = {"vq_loss": reg.loss, "commitment": reg.commitment_loss,
               "perplexity": reg.perplexity, "codebook_usage": reg.usage,
               "counts": reg.counts, "sums": reg.sums}
      return (recon, reg_loss), (h, aux)

    (recon, reg_loss), vjp_fn, (h_last, aux) = jax.vjp(forward, params["autoencoder"],
                                                       has_aux=True)

    # NLL and its gradient on the reconstruction (through LPIPS only).
    def nll_fn(r):
      pixel = _pixel_loss(loss.pixel, x, r)
      perceptual = lpips_distance(frozen, x, r)
      rec = pixel + loss.perceptual_weight * perceptual[:, None, None, None]
      nll = rec / jnp.exp(loss.logvar) + loss.logvar
      value = (jnp.sum(nll) / x.shape[0]) if loss.reduction == "sum" else jnp.mean(nll)
      return value, (jnp.mean(pixel), jnp.mean(perceptual))
    (nll, (pixel_mean, lpips_mean)), g_nll = jax.value_and_grad(nll_fn, has_aux=True)(recon)

    # The GAN terms, computed only from loss.disc_start on: before it their weight is 0
    # (LDM computes and discards them; a lax.cond skips the discriminator's three
    # passes). Before disc_start the generator's GAN gradient, the adaptive weight, the
    # discriminator's loss, logits and gradients are all 0.
    disc_on = state.step >= loss.disc_start
    disc_factor = jnp.where(disc_on, loss.disc_factor, 0.0)
    kernel = params["autoencoder"]["decoder"]["conv_out"]["kernel"]
    fake = jax.lax.stop_gradient(recon)  # the discriminator's fake: this step's recon

    def gan_terms(_):
      # Generator's GAN loss and its gradient on the reconstruction (through D only).
      def gen_fn(r):
        logits = model.apply({"params": params}, r, method=AutoencoderGAN.discriminate)
        return gan.generator_loss(logits)
      g_loss, g_gan = jax.value_and_grad(gen_fn)(recon)
      d_weight = loss.disc_weight * gan.adaptive_weight(
          _last_layer_grad(h_last, kernel, g_nll), _last_layer_grad(h_last, kernel, g_gan))

      # Discriminator: real vs the (stopped) reconstruction.
      def disc_fn(dp):
        real_logits = model.apply({"params": {"discriminator": dp}}, x,
                                  method=AutoencoderGAN.discriminate)
        fake_logits = model.apply({"params": {"discriminator": dp}}, fake,
                                  method=AutoencoderGAN.discriminate)
        value = disc_factor * disc_loss_fn(real_logits, fake_logits)
        return value, (jnp.mean(real_logits), jnp.mean(fake_logits))
      (d_loss, (logits_real, logits_fake)), d_grads = jax.value_and_grad(
          disc_fn, has_aux=True)(d_params)
      return g_loss, g_gan, d_weight, d_loss, logits_real, logits_fake, d_grads

    def no_gan(_):  # zeros of gan_terms' shapes and dtypes
      return jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype),
                                    jax.eval_shape(gan_terms, None))

    g_loss, g_gan, d_weight, d_loss, logits_real, logits_fake, d_grads = jax.lax.cond(
        disc_on, gan_terms, no_gan, None)
    reg_weight = loss.kl_weight if kind == "kl" else loss.codebook_weight
    (ae_grads,) = vjp_fn((g_nll + d_weight * disc_factor * g_gan,
                          jnp.asarray(reg_weight, reg_loss.dtype)))
    total = nll + reg_weight * reg_loss + d_weight * disc_factor * g_loss

    grads = {"autoencoder": ae_grads, "discriminator": d_grads}
    updates, opt_state = tx.update(grads, state.opt_state, params)
    new_params = optax.apply_updates(params, updates)
    if ema_codebook:
      ae = dict(new_params["autoencoder"])
      ae["quantize"] = vae_lib.ema_codebook_update(
          params["autoencoder"]["quantize"], aux["counts"], aux["sums"],
          loss.ema_codebook_decay)
      new_params = dict(new_params, autoencoder=ae)
    decay = ema_decay(state.step, ema, ema_warmup)
    ema_params = ema_update(state.ema_params, new_params, decay)

    mse = jnp.mean((x - recon) ** 2, axis=(1, 2, 3))
    metrics = {
        "loss": total, "nll": nll, "rec_pixel": pixel_mean, "lpips": lpips_mean,
        "g_loss": g_loss, "d_weight": d_weight, "disc_factor": disc_factor,
        "d_loss": d_loss, "logits_real": logits_real, "logits_fake": logits_fake,
        "psnr": jnp.mean(10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))),
        "grad_norm": optax.global_norm(ae_grads), "grad_norm_disc": optax.global_norm(d_grads),
    }
    metrics.update({k: v for k, v in aux.items() if k not in ("counts", "sums")})
    if nan_policy == "skip":
      finite = (jnp.isfinite(total) & jnp.isfinite(metrics["grad_norm"]) & jnp.isfinite(d_loss)
                & jnp.isfinite(metrics["grad_norm_disc"]))
      keep = lambda new, old: jax.tree_util.tree_map(  # noqa: E731
          lambda a, b: jnp.where(finite, a, b), new, old)
      new_params, opt_state, ema_params = keep((new_params, opt_state, ema_params),
                                               (params, state.opt_state, state.ema_params))
      metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
    if lr_schedule is not None:
      metrics["learning_rate"] = lr_schedule(state.step)
    return state.replace(step=state.step + 1, params=new_params, opt_state=opt_state,
                         ema_params=ema_params), metrics

  return train_step


# -- evaluation ---------------------------------------------------------------------------

def reconstruction_metrics(model: AutoencoderGAN, params, frozen: dict, images_uint8: np.ndarray,
                           batch_size: int = 250) -> tuple[dict, np.ndarray]:
  """Deterministic reconstructions (posterior mode / quantised) of `images_uint8` and
  their quality: PSNR and SSIM (on [0, 1] images), LPIPS when weights are given, and
  for VQ the codebook usage and perplexity over the whole set.

  Returns (metrics, reconstructions uint8).
  """
  from ldm_jax.evaluation.image_metrics import psnr, ssim
  from ldm_jax.training.step import to_model_range

  @jax.jit
  def run(params, frozen, batch):
    x = to_model_range(batch)
    recon, reg = model.apply({"params": params}, x, None, False,
                             method=AutoencoderGAN.reconstruct)
    recon = jnp.clip(recon, -1.0, 1.0)
    a, b = (x + 1) / 2, (recon + 1) / 2
    out = {"psnr": psnr(a, b, 1.0), "ssim": ssim(a, b, 1.0),
           "lpips": lpips_distance(frozen, x, recon)}
    counts = reg.counts if model.kind == "vq" else jnp.zeros((1,))
    return out, counts, jnp.round(b * 255).astype(jnp.uint8)

  totals, counts, recons = {}, 0, []
  for start in range(0, len(images_uint8), batch_size):
    values, batch_counts, recon = run(params, frozen, images_uint8[start:start + batch_size])
    for k, v in jax.device_get(values).items():
      totals.setdefault(k, []).append(np.asarray(v))
    counts = counts + np.asarray(batch_counts)
    recons.append(np.asarray(recon))
  metrics = {k: float(np.mean(np.concatenate(v))) for k, v in totals.items()}
  if "lpips" not in frozen:
    del metrics["lpips"]
  if model.kind == "vq":
    probs = counts / counts.sum()
    metrics["codebook_usage"] = float(np.mean(counts > 0))
    metrics["perplexity"] = float(np.exp(-np.sum(probs * np.log(probs + 1e-10))))
  return metrics, np.concatenate(recons)
