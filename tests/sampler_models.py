"""The deterministic "denoiser" and per-step noise shared by the sampler parity tests.

The model is nonlinear in x and t and written once for JAX and once for torch with only
+ - * / (correctly rounded in both frameworks), so a trajectory difference is the
samplers', not the model's. Step noise is what our samplers draw at step i,
`normal(fold_in(key, i))`, to be fed to the diffusers loop.
"""

import jax
import jax.numpy as jnp
import numpy as np


def model_jax(x, t):
  """Nonlinear in x and t; t is the (B,) float32 model time."""
  s = (t * 0.001).reshape((-1,) + (1,) * (x.ndim - 1))
  return 0.5 * x * (1.0 - s * s) + 0.3 * x / (1.0 + x * x) + 0.05 * s


def model_torch(x, t):
  """`model_jax` in torch; t is the scheduler's 0-d timestep tensor (int or float)."""
  s = t * 0.001
  return 0.5 * x * (1.0 - s * s) + 0.3 * x / (1.0 + x * x) + 0.05 * s


def noise_key(seed):
  """The "rbg" PRNG: the samplers' noise rule is the same for any key type, and its
  graphs compile in a third of threefry's time."""
  return jax.random.key(seed, impl="rbg")


def step_noises(key, n, shape):
  """(n, *shape): the noise our samplers draw at steps 0..n-1."""
  return np.asarray(_step_noises(key, jnp.arange(n), tuple(shape)))


def _draw(key, steps, shape):
  # lax.map, not vmap: a batched RngBitGenerator ("rbg") does not reproduce per-key draws.
  return jax.lax.map(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32),
                     steps)


_step_noises = jax.jit(_draw, static_argnums=2)
