"""Tiled encoding / decoding with the LDM autoencoders, for images larger than memory
allows in one pass.

The scheme is diffusers' `AutoencoderKL.tiled_encode` / `tiled_decode` (so results
match it): tiles of `T` latent pixels (`T * f` image pixels) start every
`T - e` latent pixels, `e = int(T * overlap)`; tiles at the right / bottom edge are
cut short by the image border. Tile (r, c) is first blended with the tile above
over its top `e` rows, then with the tile to its left over its left `e` columns,
each with a linear ramp (weight y / e on the new tile, 1 - y / e on the old one;
`e` shrinks to the shorter tile's size at an edge), using the neighbours' already
blended values, and is then cropped to its top-left `T - e` rows / columns. When the
image fits in one tile (both sides <= the tile) the result is the untiled one. The
blend width is counted in latent pixels (`e * f` image pixels when decoding); where
`T * overlap` is an integer, as with diffusers' defaults, this is diffusers' scheme
exactly (otherwise diffusers' image and latent strides disagree).

Encoding blends the KL posterior's moments (mean, log-variance before the clip, as
diffusers does) or a VQ model's unquantised latents; decoding blends images (a VQ
model quantises per position, so quantising per tile changes nothing).

Tiles of equal shape (at most four shapes: interior, right edge, bottom edge,
corner) go through one jitted call, stacked along the batch axis; `tiles_per_call`
caps how many tiles one call takes (the last chunk is padded so every chunk reuses
one compilation), which bounds the memory.

Not exact: a tile's GroupNorm statistics and self-attention see only that tile, so
tiled and untiled results differ (the same limitation as diffusers' tiling) by an
amount that depends on the weights and the image; the overlap blending hides seams
but not the shift. Use the largest tile memory allows.
"""

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.errors import check
from ldm_jax.models.vae import AutoencoderKL, DiagonalGaussian, VQModel

DEFAULT_OVERLAP = 0.25  # diffusers' tile_overlap_factor


def _kl_moments(module: AutoencoderKL, x: jax.Array) -> jax.Array:
  """Encoder (+ quant_conv) output (B, h, w, 2C) before the posterior's log-variance clip."""
  moments = module.encoder(x)
  if module.use_quant_conv:
    moments = module.quant_conv(moments)
  return moments.astype(jnp.float32)


def _decode_not_quantized(module: VQModel, z: jax.Array) -> jax.Array:
  return module.decode(z, force_not_quantize=True)


@functools.lru_cache(maxsize=64)
def _jitted(model, method):
  return jax.jit(functools.partial(model.apply, method=method))


def _variables(params) -> dict:
  if isinstance(params, Mapping) and set(params.keys()) == {"params"}:
    return params
  return {"params": params}


def _check_model(model) -> int:
  check(isinstance(model, (AutoencoderKL, VQModel)), "tiling: model must be an AutoencoderKL "
        f"or VQModel, not {type(model).__name__}")
  return model.downsampling_factor


def _blend_weights(extent: int) -> tuple[np.ndarray, np.ndarray]:
  """(old, new) tile weights of the `extent` blended rows: 1 - y/extent, y/extent."""
  ramp = np.arange(extent, dtype=np.float64) / extent
  return (1.0 - ramp).astype(np.float32), ramp.astype(np.float32)


def _blend_rows(above: jax.Array, tile: jax.Array, extent: int) -> jax.Array:
  extent = min(above.shape[1], tile.shape[1], extent)
  if extent == 0:
    return tile
  old, new = (w[None, :, None, None] for w in _blend_weights(extent))
  return tile.at[:, :extent].set(above[:, -extent:] * old + tile[:, :extent] * new)


def _blend_cols(left: jax.Array, tile: jax.Array, extent: int) -> jax.Array:
  extent = min(left.shape[2], tile.shape[2], extent)
  if extent == 0:
    return tile
  old, new = (w[None, None, :, None] for w in _blend_weights(extent))
  return tile.at[:, :, :extent].set(left[:, :, -extent:] * old + tile[:, :, :extent] * new)


def _run_tiles(fn, variables, x, tile: int, stride: int, tiles_per_call: int | None):
  """fn(variables, batch of equal-shape tiles) for every tile of `x` -> grid of outputs."""
  batch, height, width = x.shape[:3]
  if height <= tile and width <= tile:  # one tile: the untiled result
    rows, cols = range(1), range(1)
  else:
    rows, cols = range(0, height, stride), range(0, width, stride)
  groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
  for r, i in enumerate(rows):
    for c, j in enumerate(cols):
      groups.setdefault((min(tile, height - i), min(tile, width - j)), []).append((r, c))
  grid: list[list[Any]] = [[None] * len(cols) for _ in rows]
  for (h, w), members in groups.items():
    chunk = min(tiles_per_call or len(members), len(members))
    for start in range(0, len(members), chunk):
      part = members[start:start + chunk]
      padded = part + [part[-1]] * (chunk - len(part))  # one compiled shape per group
      inputs = jnp.concatenate([jnp.asarray(x[:, rows[r]:rows[r] + h, cols[c]:cols[c] + w])
                                for r, c in padded], axis=0)  # (chunk * B, h, w, C)
      out = fn(variables, inputs)
      for k, (r, c) in enumerate(part):
        grid[r][c] = out[k * batch:(k + 1) * batch]
  return grid


def _assemble(grid, extent: int, limit: int) -> jax.Array:
  """Blends each tile into its upper and left neighbours and crops it to `limit`."""
  if len(grid) == 1 and len(grid[0]) == 1:  # the image fitted in one tile
    return grid[0][0]
  blended: list[list[Any]] = []
  for r, row in enumerate(grid):
    out_row = []
    for c, tile in enumerate(row):
      if r > 0:
        tile = _blend_rows(blended[r - 1][c], tile, extent)
      if c > 0:
        tile = _blend_cols(out_row[c - 1], tile, extent)
      out_row.append(tile)
    blended.append(out_row)
  return jnp.concatenate([jnp.concatenate([t[:, :limit, :limit] for t in row], axis=2)
                          for row in blended], axis=1)


def _check_tiling(what: str, tile: int, overlap: float, tiles_per_call: int | None) -> int:
  check(0.0 <= overlap <= 0.5, f"{what}: overlap {overlap} out of range; valid: 0 <= overlap "
        f"<= 0.5 (fraction of a tile; diffusers uses {DEFAULT_OVERLAP})")
  check(tiles_per_call is None or (isinstance(tiles_per_call, int) and tiles_per_call >= 1),
        f"{what}: tiles_per_call {tiles_per_call!r}; valid: None (all tiles of a shape at once)"
        " or an int >= 1")
  return int(tile * overlap)


def tiled_encode(model, params, x, *, tile_size: int, overlap: float = DEFAULT_OVERLAP,
                 tiles_per_call: int | None = None):
  """`model.encode` in overlapping tiles (see the module docstring).

  Args:
    model: an `AutoencoderKL` or `VQModel`.
    params: its params (or {"params": params}).
    x: images (B, H, W, in_channels), H and W multiples of the downsampling factor f.
    tile_size: tile side in image pixels, a multiple of f (diffusers'
      `tile_sample_min_size`); the latent tile is tile_size / f.
    overlap: fraction of a latent tile blended with each neighbour (diffusers'
      `tile_overlap_factor`), 0 <= overlap <= 0.5.
    tiles_per_call: most tiles one jitted call takes; None = all of a shape.
  Returns:
    What `model.encode` returns: a `DiagonalGaussian` (KL) or latents (B, H/f, W/f, D)
    (VQ).
  """
  f = _check_model(model)
  check(isinstance(tile_size, int) and tile_size >= f and tile_size % f == 0,
        f"tiled_encode: tile_size {tile_size!r} must be a positive multiple of the "
        f"downsampling factor {f}")
  check(x.ndim == 4, f"tiled_encode: images of shape {x.shape}; expected (B, H, W, C)")
  height, width = x.shape[1:3]
  check(height % f == 0 and width % f == 0, f"tiled_encode: image size {height}x{width} is "
        f"not a multiple of the downsampling factor {f}; crop or pad to a multiple of {f}")
  latent_tile = tile_size // f
  extent = _check_tiling("tiled_encode", latent_tile, overlap, tiles_per_call)
  limit = latent_tile - extent
  is_kl = isinstance(model, AutoencoderKL)
  fn = _jitted(model, _kl_moments if is_kl else "encode")
  grid = _run_tiles(fn, _variables(params), x, tile_size, limit * f, tiles_per_call)
  out = _assemble(grid, extent, limit)
  return DiagonalGaussian.from_moments(out) if is_kl else out


def tiled_decode(model, params, z, *, tile_latent_size: int,
                 overlap: float = DEFAULT_OVERLAP, tiles_per_call: int | None = None,
                 force_not_quantize: bool = False) -> jax.Array:
  """`model.decode` in overlapping tiles (see the module docstring).

  Args:
    model: an `AutoencoderKL` or `VQModel`.
    params: its params (or {"params": params}).
    z: latents (B, h, w, C) as `model.decode` takes them.
    tile_latent_size: tile side in latent pixels (diffusers' `tile_latent_min_size`);
      the image tile is tile_latent_size * f.
    overlap: fraction of a latent tile blended with each neighbour, 0 <= overlap <= 0.5;
      the image overlap is int(tile_latent_size * overlap) * f pixels.
    tiles_per_call: most tiles one jitted call takes; None = all of a shape.
    force_not_quantize: VQ only, as `VQModel.decode`.
  Returns:
    Images (B, f h, f w, out_channels), float32.
  """
  f = _check_model(model)
  check(isinstance(tile_latent_size, int) and tile_latent_size >= 1,
        f"tiled_decode: tile_latent_size {tile_latent_size!r} must be a positive int")
  check(z.ndim == 4, f"tiled_decode: latents of shape {z.shape}; expected (B, h, w, C)")
  check(not force_not_quantize or isinstance(model, VQModel),
        "tiled_decode: force_not_quantize is for VQModel only")
  extent = _check_tiling("tiled_decode", tile_latent_size, overlap, tiles_per_call)
  limit = tile_latent_size - extent
  fn = _jitted(model, _decode_not_quantized if force_not_quantize else "decode")
  grid = _run_tiles(fn, _variables(params), z, tile_latent_size, limit, tiles_per_call)
  return _assemble(grid, extent * f, limit * f)
