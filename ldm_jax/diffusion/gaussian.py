"""Discrete-time Gaussian diffusion: DDPM (Ho et al. 2020), improved DDPM (Nichol &
Dhariwal 2021: cosine schedule, learned variance, hybrid loss), v-prediction (Salimans &
Ho 2022), min-SNR-γ weighting (Hang et al. 2023), zero terminal SNR (Lin et al. 2024).

x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε, t ∈ {0, …, T-1}. Prediction targets:
  epsilon  ε                               (DDPM, eq. 14 "L_simple")
  v        sqrt(ᾱ)·ε - sqrt(1-ᾱ)·x0         (Salimans & Ho 2022, "v-prediction")
  x0       x0                              (diffusers "sample")
Any one converts to the others at x_t (`predict_x0_eps`, `prediction_from_x0_eps`).

Reverse-process variance (`variance_type`), as guided-diffusion's ModelVarType:
  fixed_small    β̃_t = (1-ᾱ_{t-1})/(1-ᾱ_t)·β_t (the posterior variance; log clipped at t=0)
  fixed_large    β_t (β̃_1 at t = 0)
  learned_range  the model's extra output v ∈ [-1, 1] interpolates the logs:
                 log Σ = (v+1)/2·log β_t + (1-(v+1)/2)·log β̃_t   (improved DDPM eq. 15)
  learned        the extra output is log Σ itself
A learned variance needs a model with twice the input channels (ε | v), e.g. DiT with
learn_sigma; the loss is then L_hybrid = L_simple + λ·L_vlb (improved DDPM §3.1), with
the mean stop-gradiented inside L_vlb so L_vlb trains only the variance.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr

from ldm_jax.diffusion import schedules
from ldm_jax.diffusion.process import mean_flat, training_draws
from ldm_jax.errors import check

PREDICTIONS = ("epsilon", "v", "x0")
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range", "learned")
LOSS_WEIGHTINGS = ("simple", "snr", "min_snr")
LEARNED_VARIANCES = ("learned_range", "learned")


def _bcast(values, x):
  """(B,) -> (B, 1, 1, ...) to broadcast against x."""
  values = jnp.asarray(values)
  return values.reshape(values.shape + (1,) * (x.ndim - values.ndim))


# -- Gaussian densities (shared by L_vlb and the bits/dim evaluation) -----------
def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def _log_prob_between(lo, hi):
  """log(Φ(hi) - Φ(lo)) for lo < hi, stable in both tails (exact normal CDF)."""
  # Use the tail where the CDFs are small: Φ(hi) - Φ(lo) = Φ(-lo) - Φ(-hi).
  upper = lo > 0
  a = jnp.where(upper, -hi, lo)
  b = jnp.where(upper, -lo, hi)
  log_b, log_a = log_ndtr(b), log_ndtr(a)
  return log_b + jnp.log(-jnp.expm1(jnp.minimum(log_a - log_b, -1e-30)))


def discretized_gaussian_log_likelihood(x, mean, log_scale, bins: int = 256):
  """log P(x) per element for x on the uniform grid of `bins` levels in [-1, 1], under a
  Gaussian (mean, e^log_scale) integrated over each level's bin; the edge bins extend
  to ±∞ (Ho et al. 2020, eq. 13). Uses the exact normal CDF (guided-diffusion uses a
  tanh approximation of it, off by up to 3e-4 in probability)."""
  half_bin = 1.0 / (bins - 1)
  inv_std = jnp.exp(-log_scale)
  lo = (x - mean - half_bin) * inv_std
  hi = (x - mean + half_bin) * inv_std
  edge = 1.0 - half_bin
  return jnp.where(x < -edge, log_ndtr(hi),
                   jnp.where(x > edge, log_ndtr(-lo), _log_prob_between(lo, hi)))


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianDiffusion:
  """Discrete Gaussian diffusion with a fixed β schedule.

  Attributes:
    betas: (T,) float32 β, already rescaled when `zero_terminal_snr`.
    prediction: what the model predicts: "epsilon" | "v" | "x0".
    variance_type: see the module docstring.
    loss_weighting: "simple" (the target's own MSE) | "snr" | "min_snr"; the weights are
      stated on the x0 error, w(SNR)·|x0 - x̂0|², and converted to the target: "snr"
      is w = SNR (the ε-MSE whatever the target), "min_snr" w = min(SNR, γ).
    snr_gamma: γ of min-SNR-γ (5 in Hang et al.).
    vlb_weight: λ of L_hybrid = L_simple + λ·L_vlb, where L_vlb = Σ_t L_t is estimated by
      T·L_t at the sampled t (improved DDPM: λ = 0.001; for T = 1000 this is
      guided-diffusion's and DiT's "mse + vb").
    zero_terminal_snr: whether `betas` were rescaled to ᾱ_T = 0 (recorded for samplers
      that special-case it, as diffusers' Euler does).
  """
  betas: np.ndarray
  prediction: str = "epsilon"
  variance_type: str = "fixed_small"
  loss_weighting: str = "simple"
  snr_gamma: float = 5.0
  vlb_weight: float = 0.001
  zero_terminal_snr: bool = False

  def __post_init__(self):
    check(self.prediction in PREDICTIONS,
          f"unknown diffusion.prediction {self.prediction!r}; valid: {list(PREDICTIONS)}")
    check(self.variance_type in VARIANCE_TYPES,
          f"unknown diffusion.variance_type {self.variance_type!r}; valid: {list(VARIANCE_TYPES)}")
    check(self.loss_weighting in LOSS_WEIGHTINGS,
          f"unknown diffusion.loss_weighting {self.loss_weighting!r}; "
          f"valid: {list(LOSS_WEIGHTINGS)}")
    check(self.snr_gamma > 0, f"diffusion.snr_gamma must be > 0, got {self.snr_gamma}")
    check(self.vlb_weight >= 0, f"diffusion.vlb_weight must be >= 0, got {self.vlb_weight}")
    check(len(self.betas) >= 2, f"need at least 2 timesteps, got {len(self.betas)}")
    abar = self.alphas_cumprod
    check(bool(np.all(abar[:-1] > 0)) and bool(np.all(np.diff(abar) < 0)),
          "the β schedule must give a strictly decreasing ᾱ_t > 0 (before the last step)")

  @classmethod
  def from_config(cls, config):
    betas = schedules.make_betas(config.beta_schedule, config.num_timesteps,
                                 config.get("beta_start", 1e-4), config.get("beta_end", 0.02))
    check(float(config.get("shift", 1.0)) == 1.0 and not config.get("shift_base_resolution")
          and not config.get("shift_by_resolution"),
          f"diffusion.shift={config.get('shift')} / shift_base_resolution / "
          f"shift_by_resolution are for rectified flow (diffusion.process='flow'); the "
          f"gaussian process takes none of them (leave shift at 1.0)")
    for key, default in (("time_sampling", "logit_normal"), ("logit_mean", 0.0),
                         ("logit_std", 1.0), ("mode_scale", 1.29)):
      value = config.get(key, default)
      check(value == default or (key == "time_sampling" and value == "uniform"),
            f"diffusion.{key}={value!r} is for rectified flow (diffusion.process='flow'); "
            f"the gaussian process draws t uniformly from 0..T-1 (leave it at {default!r})")
    zero_snr = bool(config.get("rescale_zero_snr", False))
    prediction = config.get("prediction", "") or "epsilon"
    # (A diffusers scheduler config may pair them — its Euler clamps ᾱ_T to 2^-24 — and
    # `from_diffusers_scheduler` builds that process directly; a training config may not.)
    check(not (zero_snr and prediction == "epsilon"),
          "diffusion.rescale_zero_snr=True with prediction='epsilon': at zero terminal SNR "
          "x_T carries no signal and x0 = (x_T - ε)/sqrt(ᾱ_T) divides by 0 (Lin et al. "
          "2024 pair it with v-prediction); use prediction='v' or 'x0'")
    if zero_snr:
      betas = schedules.rescale_zero_terminal_snr(betas)
    return cls(betas=betas, prediction=prediction,
               variance_type=config.get("variance_type", "fixed_small"),
               loss_weighting=config.get("loss_weighting", "simple"),
               snr_gamma=config.get("snr_gamma", 5.0),
               vlb_weight=config.get("vlb_weight", 0.001), zero_terminal_snr=zero_snr)

  @property
  def num_timesteps(self) -> int:
    return len(self.betas)

  @property
  def learns_variance(self) -> bool:
    return self.variance_type in LEARNED_VARIANCES

  @property
  def alphas_cumprod(self) -> np.ndarray:
    return schedules.alphas_cumprod(self.betas)

  def alpha_bar(self, t: jax.Array) -> jax.Array:
    """ᾱ_t for integer t; t < 0 gives 1 (the clean image)."""
    table = jnp.asarray(self.alphas_cumprod)
    return jnp.where(t >= 0, table[jnp.clip(t, 0, self.num_timesteps - 1)], 1.0)

  def snr(self, t: jax.Array) -> jax.Array:
    """SNR_t = ᾱ_t / (1 - ᾱ_t)."""
    abar = self.alpha_bar(t)
    return abar / (1.0 - abar)

  # -- the process interface -------------------------------------------------
  def sample_time(self, rng, batch: int) -> jax.Array:
    return jax.random.randint(rng, (batch,), 0, self.num_timesteps)

  def model_time(self, t: jax.Array) -> jax.Array:
    return t.astype(jnp.float32)

  def add_noise(self, x0, noise, t):
    abar = _bcast(self.alpha_bar(t), x0)
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1 - abar) * noise

  def target(self, x0, noise, t):
    return self.prediction_from_x0_eps(x0, noise, t)

  # -- conversions between ε, x0 and v ------------------------------------------
  def predict_x0_eps(self, model_output, x_t, t=None, alpha_bar=None):
    """(x0, ε) implied by the model output at x_t (give t or ᾱ_t as (B,) or scalar)."""
    abar = self.alpha_bar(t) if alpha_bar is None else alpha_bar
    abar = _bcast(jnp.asarray(abar, jnp.float32), x_t) if jnp.ndim(abar) else abar
    a, s = jnp.sqrt(abar), jnp.sqrt(1 - abar)
    if self.prediction == "epsilon":
      return (x_t - s * model_output) / a, model_output
    if self.prediction == "x0":
      return model_output, (x_t - a * model_output) / s
    return a * x_t - s * model_output, a * model_output + s * x_t

  def prediction_from_x0_eps(self, x0, eps, t=None, alpha_bar=None, prediction=None):
    """The `prediction` target ("epsilon" | "v" | "x0"; default this process's) for a
    given (x0, ε) pair at time t: with `predict_x0_eps`, converts any target to any."""
    prediction = prediction or self.prediction
    check(prediction in PREDICTIONS, f"unknown prediction {prediction!r}; valid: {list(PREDICTIONS)}")
    if prediction == "epsilon":
      return eps
    if prediction == "x0":
      return x0
    abar = self.alpha_bar(t) if alpha_bar is None else jnp.asarray(alpha_bar, jnp.float32)
    abar = _bcast(abar, x0) if jnp.ndim(abar) else abar
    return jnp.sqrt(abar) * eps - jnp.sqrt(1 - abar) * x0

  # -- the posterior q(x_{t-1} | x_t, x0) and the reverse variance ----------------
  @functools.cached_property
  def _tables(self):
    """float64 numpy tables: β, ᾱ_{t-1}, posterior mean coefficients, posterior variance
    and its clipped log (the log at t = 0, where β̃ = 0, takes β̃_1's)."""
    betas = self.betas.astype(np.float64)
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    log_post_var = np.log(np.append(post_var[1], post_var[1:]))
    large = np.append(post_var[1], betas[1:])
    return dict(coef_x0=betas * np.sqrt(abar_prev) / (1.0 - abar),
                coef_xt=(1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
                post_var=post_var, log_post_var=log_post_var, log_beta=np.log(betas),
                log_large=np.log(large))

  def _table(self, name, t, x):
    return _bcast(jnp.asarray(self._tables[name], jnp.float32)[t], x)

  def q_posterior(self, x0, x_t, t):
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0) (DDPM eq. 6-7)."""
    mean = self._table("coef_x0", t, x_t) * x0 + self._table("coef_xt", t, x_t) * x_t
    return mean, self._table("post_var", t, x_t), self._table("log_post_var", t, x_t)

  def model_log_variance(self, variance_output, t, x_t):
    """log Σ_θ(x_t, t) of the reverse step at each full-chain t (B,)."""
    if self.variance_type == "fixed_small":
      return jnp.broadcast_to(self._table("log_post_var", t, x_t), x_t.shape)
    if self.variance_type == "fixed_large":
      return jnp.broadcast_to(self._table("log_large", t, x_t), x_t.shape)
    if self.variance_type == "learned":
      return variance_output
    frac = (variance_output + 1.0) / 2.0
    return frac * self._table("log_beta", t, x_t) + (1.0 - frac) * self._table(
        "log_post_var", t, x_t)

  def p_mean_variance(self, model_output, x_t, t, clip_x0: float | None = None):
    """The model's reverse step p(x_{t-1} | x_t): (mean, log-variance, x̂0).

    `model_output` has the input's channels, or twice them when the variance is learned.
    """
    channels = x_t.shape[-1]
    check(model_output.shape[:-1] == x_t.shape[:-1],
          f"the model output {model_output.shape} does not match its input {x_t.shape} "
          f"(a denoiser returns one output per pixel)")
    check(not self.learns_variance or model_output.shape[-1] == 2 * channels,
          f"diffusion.variance_type={self.variance_type!r} needs a model that outputs "
          f"{2 * channels} channels (prediction | variance), got {model_output.shape[-1]} "
          f"(for DiT set model.learn_sigma=True)")
    prediction, variance_output = model_output[..., :channels], model_output[..., channels:]
    x0, _ = self.predict_x0_eps(prediction, x_t, t)
    if clip_x0:
      x0 = jnp.clip(x0, -clip_x0, clip_x0)
    mean, _, _ = self.q_posterior(x0, x_t, t)
    return mean, self.model_log_variance(variance_output, t, x_t), x0

  # -- losses --------------------------------------------------------------------
  def _target_weight(self, t, x):
    """Per-example weight on the target's squared error implementing `loss_weighting`."""
    if self.loss_weighting == "simple":
      return None
    snr = self.snr(t)
    gamma = self.snr_gamma if self.loss_weighting == "min_snr" else jnp.inf
    w_x0 = jnp.minimum(snr, gamma)  # the weight on |x0 - x̂0|²
    # |x0 - x̂0|² = |ε - ε̂|² / SNR = |v - v̂|² / (SNR + 1): divide out those factors.
    if self.prediction == "epsilon":
      weight = jnp.where(snr < gamma, 1.0, gamma / snr)  # = min(SNR, γ)/SNR without 0/0
    elif self.prediction == "v":
      weight = w_x0 / (snr + 1.0)
    else:
      weight = w_x0
    return _bcast(weight, x)

  def vlb_terms(self, model_output, x0, x_t, t, clip_x0: float | None = None):
    """L_t in bits per dimension, per example (B,): KL(q(x_{t-1}|x_t,x0) ‖ p_θ(x_{t-1}|x_t))
    for t > 0 and the discretized-Gaussian decoder NLL -log p_θ(x0|x_1) at t = 0."""
    true_mean, _, true_log_var = self.q_posterior(x0, x_t, t)
    mean, log_var, _ = self.p_mean_variance(model_output, x_t, t, clip_x0)
    kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
    nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / math.log(2.0)
    return jnp.where(t == 0, nll, kl)

  def prior_bpd(self, x0):
    """KL(q(x_T | x0) ‖ N(0, I)) in bits per dimension, per example."""
    abar_last = float(self.alphas_cumprod.astype(np.float64)[-1])
    mean = math.sqrt(abar_last) * x0
    log_var = jnp.full_like(x0, math.log(max(1.0 - abar_last, 1e-30)))
    return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / math.log(2.0)

  def loss(self, model_fn, x0, rng, draws=None):
    """Per-example (B,) training loss and metrics.

    L_simple (weighted per `loss_weighting`) on the prediction channels; with a learned
    variance, + λ·T·L_t where L_t (`vlb_terms`) sees the prediction through
    stop_gradient, so only the variance channels learn from it (improved DDPM §3.1).
    """
    t, noise = training_draws(self, rng, x0) if draws is None else draws
    x_t = self.add_noise(x0, noise, t)
    output = model_fn(x_t, self.model_time(t))
    channels = x0.shape[-1]
    squared = (output[..., :channels] - self.target(x0, noise, t)) ** 2
    weight = self._target_weight(t, x0)
    mse = mean_flat(squared if weight is None else weight * squared)
    if not self.learns_variance:
      return mse, {"loss": mse.mean()}
    frozen = jnp.concatenate([jax.lax.stop_gradient(output[..., :channels]),
                              output[..., channels:]], axis=-1)
    vlb = self.vlb_terms(frozen, x0, x_t, t)
    per_example = mse + self.vlb_weight * self.num_timesteps * vlb
    return per_example, {"loss": per_example.mean(), "mse": mse.mean(), "vlb": vlb.mean()}

  def bits_per_dim_times(self, num_terms: int | None = None):
    """The timesteps `bits_per_dim` evaluates and the weight of each (how many of the
    T - 1 KL terms it stands for); fewer than `num_terms` when the geometric spacing
    rounds several to the same integer near t = 1."""
    total_t = self.num_timesteps
    if num_terms is None or num_terms >= total_t:
      return np.arange(total_t), np.ones(total_t)
    check(num_terms >= 2, f"num_terms must be >= 2 (t = 0 and one KL term), got {num_terms}")
    rest = np.unique(np.round(np.geomspace(1, total_t - 1, num_terms - 1)).astype(np.int64))
    every = np.arange(1, total_t)
    nearest = np.abs(np.log(every)[:, None] - np.log(rest)[None, :]).argmin(axis=1)
    return (np.concatenate([[0], rest]),
            np.concatenate([[1.0], np.bincount(nearest, minlength=len(rest))]))

  def bits_per_dim(self, model_fn, x0, rng, clip_x0: float | None = None,
                   num_terms: int | None = None):
    """The variational bound -log p(x0) ≤ Σ_{t≥1} KL_t + decoder NLL + prior, in bits per
    dimension, per example (B,) (improved DDPM §3; guided-diffusion's calc_bpd_loop).
    x0 must lie on the 256-level grid in [-1, 1]. One noise draw per t.

    num_terms: None evaluates every t (T model calls: the exact bound, up to its Monte
      Carlo noise); k < T evaluates t = 0 exactly and estimates Σ_{t=1}^{T-1} KL_t by a
      Riemann sum over k - 1 evenly spaced t (the KL terms vary smoothly in t).
    Returns (total (B,), {"vlb_t": (k, B) terms, "t": (k,), "prior": (B,)}).
    """
    times, weights = self.bits_per_dim_times(num_terms)

    def scan_body(carry, inputs):
      t, weight = inputs
      noise = jax.random.normal(jax.random.fold_in(rng, t), x0.shape, x0.dtype)
      tb = jnp.full((x0.shape[0],), t)
      x_t = self.add_noise(x0, noise, tb)
      terms = self.vlb_terms(model_fn(x_t, self.model_time(tb)), x0, x_t, tb, clip_x0)
      return carry + weight * terms, terms

    zeros = jnp.zeros((x0.shape[0],), jnp.float32)
    total, per_t = jax.lax.scan(scan_body, zeros, (jnp.asarray(times, jnp.int32),
                                                   jnp.asarray(weights, jnp.float32)))
    prior = self.prior_bpd(x0)
    return total + prior, {"vlb_t": per_t, "t": times, "prior": prior}
