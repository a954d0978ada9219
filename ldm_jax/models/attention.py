"""Scaled dot-product attention with a choice of backend.

Every attention in ldm_jax goes through `layers.Attention`, which calls
`dot_product_attention` here on (batch, tokens, heads, head_dim) arrays. Backends:

  xla     einsum + float32 softmax, portable (the default; the reference numbers).
  cudnn   `jax.nn.dot_product_attention(implementation="cudnn")`: fused flash
          attention on CUDA GPUs, bfloat16 / float16 inputs only.
  pallas  Pallas flash-attention kernels: the TPU kernel on TPU, the Triton one on
          GPU. `interpret=True` runs either in Pallas' interpreter on any platform
          (slow; for tests on CPU).
  auto    by platform: cpu -> xla, gpu -> cudnn (xla for float32), tpu -> pallas
          (xla when the token count is not a multiple of 128, which the TPU kernel needs).

Kernels see local arrays only, so under an active mesh (`jax.set_mesh`) the
Pallas kernel runs inside `jax.shard_map`: batch split over the data-parallel mesh
axes ("data", "fsdp", "dcn*") and heads over "tensor".
"""

import contextlib
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from ldm_jax.errors import check

BACKENDS = ("xla", "cudnn", "pallas", "auto")
PALLAS_KERNELS = ("tpu", "gpu")
_BATCH_AXES = ("data", "fsdp")  # plus every axis whose name starts with "dcn"
_HEAD_AXIS = "tensor"
TPU_BLOCK = 128  # the TPU kernel's key/value blocks are multiples of 128 tokens


_TARGET_PLATFORM = []  # innermost `target_platform` context last


@contextlib.contextmanager
def target_platform(platform: str):
  """Resolve backends for `platform` ("tpu", "gpu", "cpu") instead of JAX's default
  backend while tracing inside this context: ahead-of-time compilation for a TPU on a
  CPU machine must pick (and lower) the TPU kernels."""
  _TARGET_PLATFORM.append(platform)
  try:
    yield
  finally:
    _TARGET_PLATFORM.pop()


def target_platform_name() -> str:
  """The platform attention is traced for: a `target_platform` context's, else JAX's."""
  return _TARGET_PLATFORM[-1] if _TARGET_PLATFORM else jax.default_backend()


def resolve_backend(backend: str, dtype=jnp.float32, platform: str | None = None,
                    tokens: int = TPU_BLOCK) -> str:
  """The concrete backend `backend` means on `platform` (default: JAX's default)
  for `tokens`-long sequences in `dtype`.

  Raises:
    UserError for an unknown name, or a backend the platform cannot run.
  """
  check(backend in BACKENDS, f"unknown attention backend {backend!r}; valid: {list(BACKENDS)}")
  platform = platform or target_platform_name()
  if backend == "auto":
    low_precision = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    tpu_kernel_fits = tokens % TPU_BLOCK == 0
    return {"tpu": "pallas" if tpu_kernel_fits else "xla",
            "gpu": "cudnn" if low_precision else "xla"}.get(platform, "xla")
  return backend


def valid_backends(platform: str | None = None, interpret: bool = False) -> list[str]:
  """The backend names that run on `platform` (pallas everywhere when interpreted)."""
  platform = platform or target_platform_name()
  names = ["xla", "auto"]
  if platform == "gpu":
    names.append("cudnn")
  if platform in ("gpu", "tpu") or interpret:
    names.append("pallas")
  return sorted(names)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, backend: str = "xla",
                          interpret: bool = False, pallas_kernel: str | None = None
                          ) -> jax.Array:
  """softmax(q k^T / sqrt(head_dim)) v, without masking.

  Args:
    q, k, v: (B, T, H, Dh) arrays of one dtype (the compute dtype).
    backend: one of BACKENDS (see the module docstring).
    interpret: run the Pallas kernel in Pallas' interpreter (any platform).
    pallas_kernel: "tpu" or "gpu" picks the Pallas kernel; default: the platform's
      (on CPU, "gpu", whose interpreter is the faster one).
  Returns:
    (B, T, H, Dh) attention output in the dtype of `v`. The softmax is computed in
    float32 by every backend.
  Raises:
    UserError for an unknown backend, or one this platform cannot run.
  """
  platform = target_platform_name()
  backend = resolve_backend(backend, q.dtype, platform, tokens=q.shape[1])
  if backend == "xla":
    return xla_attention(q, k, v)
  if backend == "cudnn":
    check(platform == "gpu", f"attention backend 'cudnn' needs a CUDA GPU, but JAX runs on "
          f"{platform!r}; valid here: {valid_backends(platform)}")
    check(q.dtype in (jnp.bfloat16, jnp.float16), f"attention backend 'cudnn' needs bfloat16 "
          f"or float16 inputs, got {q.dtype}; set the model's dtype to 'bfloat16' or use 'xla'")
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  check(platform in ("gpu", "tpu") or interpret,
        f"attention backend 'pallas' needs a GPU or TPU (or interpret=True), but JAX runs on "
        f"{platform!r}; valid here: {valid_backends(platform)}")
  kernel = pallas_kernel or ("tpu" if platform == "tpu" else "gpu")
  check(kernel in PALLAS_KERNELS,
        f"unknown pallas kernel {kernel!r}; valid: {list(PALLAS_KERNELS)}")
  run = _pallas_tpu if kernel == "tpu" else _pallas_gpu
  return _on_local_shards(lambda q, k, v: run(q, k, v, interpret), q, k, v)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """The portable path: einsum logits, float32 softmax, einsum with v."""
  head_dim = q.shape[-1]
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(head_dim)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)  # (B, T, H, Dh)


def _block(tokens: int, sizes=(128, 64, 32, 16)) -> int:
  """Largest kernel block from `sizes` that divides `tokens`."""
  for size in sizes:
    if tokens % size == 0:
      return size
  check(False, f"attention backend 'pallas' needs a token count divisible by {sizes[-1]}, got "
        f"{tokens}; change the image / patch size or use attention 'xla' or 'cudnn'")
  return 0


def _pallas_gpu(q, k, v, interpret: bool) -> jax.Array:
  """The Pallas Triton flash-attention kernel; takes (B, T, H, Dh) as is."""
  from jax.experimental.pallas.ops.gpu import attention  # pylint: disable=import-outside-toplevel
  block = _block(q.shape[1])
  sizes = attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=block,
                               block_kv_dkv=block, block_q_dq=block, block_kv_dq=block)
  return attention.mha(q, k, v, None, sm_scale=1 / math.sqrt(q.shape[-1]),
                       block_sizes=sizes, interpret=interpret)


def _pallas_tpu(q, k, v, interpret: bool) -> jax.Array:
  """The Pallas TPU flash-attention kernel, which wants (B, H, T, Dh) and T a
  multiple of 128 (its forward and backward tile keys by 128)."""
  # pylint: disable=import-outside-toplevel  (Pallas TPU code loads only when used)
  from jax.experimental.pallas import tpu as pltpu
  from jax.experimental.pallas.ops.tpu import flash_attention as fa
  tokens, head_dim = q.shape[1], q.shape[-1]
  check(tokens % TPU_BLOCK == 0,
        f"attention backend 'pallas' on TPU needs a token count that is a multiple of "
        f"{TPU_BLOCK}, got {tokens}; use 'xla' (or 'auto', which picks it for such sizes)")
  check(head_dim <= 128 or head_dim % 128 == 0, f"attention backend 'pallas' on TPU needs a "
        f"head dim of at most 128 or a multiple of 128, got {head_dim}; use 'xla'")
  block = TPU_BLOCK
  sizes = fa.BlockSizes(block_q=block, block_k_major=block, block_k=block, block_b=1,
                        block_q_major_dkv=block, block_k_major_dkv=block, block_k_dkv=block,
                        block_q_dkv=block, block_k_major_dq=block, block_k_dq=block,
                        block_q_dq=block)
  to_bhtd = lambda x: x.transpose(0, 2, 1, 3)
  kernel = lambda q, k, v: to_bhtd(fa.flash_attention(
      to_bhtd(q), to_bhtd(k), to_bhtd(v), sm_scale=1 / math.sqrt(head_dim), block_sizes=sizes))
  if not interpret:
    return kernel(q, k, v)
  return _traced_in(pltpu.force_tpu_interpret_mode, kernel)(q, k, v)


def _traced_in(context, fn):
  """`fn` whose forward and backward are both traced inside `context()`: the TPU
  interpret switch is read at trace time, and a backward pass is traced after the
  forward has returned."""

  @jax.custom_vjp
  def wrapped(*args):
    with context():
      return fn(*args)

  def forward(*args):
    with context():
      return jax.vjp(fn, *args)  # (output, vjp function: a pytree of residuals)

  def backward(vjp, cotangent):
    with context():
      return vjp(cotangent)

  wrapped.defvjp(forward, backward)
  return wrapped


def mesh_axes_for_attention(axis_names) -> tuple[tuple[str, ...], str | None]:
  """(batch axes, head axis) of a mesh: data-parallel names and "tensor" if present."""
  batch = tuple(a for a in axis_names if a in _BATCH_AXES or a.startswith("dcn"))
  return batch, (_HEAD_AXIS if _HEAD_AXIS in axis_names else None)


def _on_local_shards(fn, q, k, v):
  """`fn(q, k, v)` on each device's shard when a mesh is active, else directly."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(q, k, v)
  batch_axes, head_axis = mesh_axes_for_attention(mesh.axis_names)
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  # Split what divides (a batch of 1 at init, a sample batch, heads vs tensor); the
  # rest stays whole on every device.
  if q.shape[0] % math.prod(sizes[a] for a in batch_axes) != 0:
    batch_axes = ()
  if head_axis is not None and q.shape[2] % sizes[head_axis] != 0:
    head_axis = None
  spec = PartitionSpec(batch_axes or None, None, head_axis, None)
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q, k, v)
