"""β schedules for discrete Gaussian diffusion, computed as diffusers computes them
(float32 β from torch's float32 linspace, cumulative product accumulated in float64 as
torch's CPU cumprod does) so samplers match its schedulers bit for bit."""

import math

import numpy as np

from ldm_jax.errors import check

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine", "sigmoid", "laplace", "exp")


def cosine_alpha_bar(t: float, s: float = 0.008) -> float:
  """ᾱ(t) of Nichol & Dhariwal (improved DDPM, eq. 17), t in [0, 1]."""
  return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def laplace_alpha_bar(t: float) -> float:
  """ᾱ(t) whose log-SNR follows a Laplace quantile (diffusers' "laplace" schedule)."""
  log_snr = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
  snr = math.exp(log_snr)
  return math.sqrt(snr / (1 + snr))


def exp_alpha_bar(t: float) -> float:
  """ᾱ(t) = exp(-12 t) (diffusers' "exp" schedule of HeunDiscreteScheduler)."""
  return math.exp(t * -12.0)


_ALPHA_BAR_FNS = {"cosine": cosine_alpha_bar, "laplace": laplace_alpha_bar, "exp": exp_alpha_bar}


def _torch_linspace_float32(start: float, end: float, num: int) -> np.ndarray:
  """`torch.linspace(start, end, num, dtype=torch.float32)` bit for bit (its CPU kernel):
  a float32 step, the first half `start + step·i`, the second half `end - step·(num-1-i)`,
  each a fused multiply-add (one rounding; exact here through float64)."""
  start32, end32 = np.float32(start), np.float32(end)
  if num == 1:
    return np.array([start32], np.float32)
  step = np.float64((end32 - start32) / np.float32(num - 1))
  i = np.arange(num, dtype=np.float64)
  low = np.float64(start32) + step * i
  high = np.float64(end32) - step * (num - 1 - i)
  return np.where(i < num // 2, low, high).astype(np.float32)


def make_betas(schedule: str, num_timesteps: int, beta_start: float = 1e-4,
               beta_end: float = 0.02, max_beta: float = 0.999) -> np.ndarray:
  """Returns (T,) float32 betas.

  linear: Ho et al. (DDPM), β from beta_start to beta_end.
  scaled_linear: Stable Diffusion, linear in sqrt(β).
  cosine: Nichol & Dhariwal, β_t = min(1 - ᾱ(t+1)/ᾱ(t), max_beta) (diffusers'
    "squaredcos_cap_v2"); "laplace" and "exp" discretise other ᾱ(t) the same way.
  sigmoid: GeoDiff, β = sigmoid(linspace(-6, 6)) scaled to [beta_start, beta_end].
  """
  check(schedule in BETA_SCHEDULES,
        f"unknown beta schedule {schedule!r}; valid: {list(BETA_SCHEDULES)}")
  check(num_timesteps >= 1, f"num_timesteps must be >= 1, got {num_timesteps}")
  if schedule == "linear":
    betas = _torch_linspace_float32(beta_start, beta_end, num_timesteps)
  elif schedule == "scaled_linear":
    betas = _torch_linspace_float32(beta_start ** 0.5, beta_end ** 0.5, num_timesteps) ** 2
  elif schedule == "sigmoid":
    x = _torch_linspace_float32(-6.0, 6.0, num_timesteps)
    sig = (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)
    betas = sig * np.float32(beta_end - beta_start) + np.float32(beta_start)
  else:
    fn = _ALPHA_BAR_FNS[schedule]
    betas = np.array([min(1 - fn((i + 1) / num_timesteps) / fn(i / num_timesteps), max_beta)
                      for i in range(num_timesteps)])
  return betas.astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Lin et al. 2024 ("Common diffusion noise schedules and sample steps are flawed",
  Algorithm 1): shift and scale sqrt(ᾱ) so that ᾱ_T = 0 (zero terminal SNR) while ᾱ_0
  is kept; returns the float32 betas, computed in diffusers' float32 operation order."""
  sqrt_abar = np.sqrt(alphas_cumprod(betas))
  first, last = sqrt_abar[0], sqrt_abar[-1]
  sqrt_abar = (sqrt_abar - last) * (first / (first - last))
  abar = sqrt_abar ** 2
  alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
  return (np.float32(1.0) - alphas).astype(np.float32)


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
  """ᾱ_t = Π_{s≤t} (1 - β_s) of float32 α = 1 - β, the running product accumulated in
  float64 and rounded to float32 (as torch's CPU `cumprod` does for float32)."""
  alphas = (np.float32(1.0) - betas.astype(np.float32)).astype(np.float32)
  return np.cumprod(alphas, dtype=np.float64).astype(np.float32)
