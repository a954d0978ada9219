"""β schedules for discrete Gaussian diffusion, computed as diffusers computes them
(float32 β from torch's float32 linspace, cumulative product accumulated in float64 as
torch's CPU cumprod does) so samplers match its schedulers bit for bit."""

import math

import numpy as np

from ldm_jax.errors import check

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")


def cosine_alpha_bar(t: float, s: float = 0.008) -> float:
  """ᾱ(t) of Nichol & Dhariwal (improved DDPM, eq. 17), t in [0, 1]."""
  return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2


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
  cosine: Nichol & Dhariwal, β_t = min(1 - ᾱ(t+1)/ᾱ(t), max_beta).
  """
  check(schedule in BETA_SCHEDULES,
        f"unknown beta schedule {schedule!r}; valid: {list(BETA_SCHEDULES)}")
  check(num_timesteps >= 1, f"num_timesteps must be >= 1, got {num_timesteps}")
  if schedule == "linear":
    betas = _torch_linspace_float32(beta_start, beta_end, num_timesteps)
  elif schedule == "scaled_linear":
    betas = _torch_linspace_float32(beta_start ** 0.5, beta_end ** 0.5, num_timesteps) ** 2
  else:
    betas = np.array([
        min(1 - cosine_alpha_bar((i + 1) / num_timesteps) / cosine_alpha_bar(i / num_timesteps),
            max_beta) for i in range(num_timesteps)])
  return betas.astype(np.float32)


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
  """ᾱ_t = Π_{s≤t} (1 - β_s) of float32 α = 1 - β, the running product accumulated in
  float64 and rounded to float32 (as torch's CPU `cumprod` does for float32)."""
  alphas = (np.float32(1.0) - betas.astype(np.float32)).astype(np.float32)
  return np.cumprod(alphas, dtype=np.float64).astype(np.float32)
