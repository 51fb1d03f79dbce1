"""Tiled encode and decode: images whose activations do not fit in device memory at once.

The first-stage decoder's activations scale with the image: a 4096x4096 decode through a
128-channel level holds 8 GiB per activation, and the mid-block attention is quadratic in
the latent's area. Tiling runs the model on overlapping windows instead and blends the
windows' outputs with linear ramps over the overlap, as diffusers'
`AutoencoderKL.enable_tiling` does (`tiled_encode` / `tiled_decode`, `blend_v` /
`blend_h`, overlap factor 0.25):

- the input is walked in tiles of `tile` (sample pixels; `tile / f` latent positions) with
  a stride of `int(tile / f * (1 - overlap))` latent positions;
- tile k's output is blended into tile k-1's over the first `tile / f - stride` positions
  of tile k (k-1's weight falls linearly from 1 to 1/n), tiles being visited row by row,
  vertical blend first, each blend reading its neighbour *after* that neighbour's own
  blends; then every tile is cropped to the stride. That in-place order is diffusers' and
  is kept: it makes the corner of four tiles not quite bilinear (the upper neighbour's
  weight there is wx^2 (1 - wy), not wx (1 - wy)), and matching it is what lets the
  outputs be compared with diffusers number for number.

Where diffusers' own sizes are consistent (`tile / f * overlap` an integer, e.g. a tile
that is a multiple of 4f at 0.25) the geometry here is exactly theirs; elsewhere diffusers'
crop and stride disagree and its output has the wrong size, while here the crop is always
the stride.

Edge tiles (`edges`). diffusers cuts the last tile of each row and column short at the
image border (and always has one: it starts a tile at every multiple of the stride below
the size), so its model runs on several shapes, some only a sliver of latent wide. Here
the default is `edges="shift"`: the last tile is moved back to end at the border, so every
tile has one shape, the per-tile function compiles once, and every tile sees a full
tile's context. Padding instead would keep the position but feed the GroupNorm statistics
and the mid-block attention made-up content. Blending follows absolute positions, so the
shifted tile blends over the same `overlap` width right after its own start. With
`edges="truncate"` the tiles are diffusers' exactly, cut short at the border; that
compiles a few more (smaller) shapes and exists to reproduce diffusers' numbers.

Memory. Each tile goes through one jitted function of the model's weights and a
fixed-shape tile (`_step`, cached on the model's graph definition and the tile shape), so
device memory holds the weights, one tile's activations and one tile's output, whatever
the image size: `lower_tile` gives that computation for `memory_analysis`. The blending
runs on the host in NumPy float32 into a host buffer, keeping the previous row of
blended tiles (later tiles read their unused tails); the result goes to the device once,
so the return types are `model.encode`'s and `model.decode`'s.

A tiled output differs from the untiled one everywhere, a little: every tile normalizes
with its own GroupNorm statistics and attends only within itself. Overlap and blending hide
the seams; they do not make tiling exact.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

EDGES = ("shift", "truncate")


@dataclasses.dataclass(frozen=True)
class _Axis:
  """Where the tiles lie along one spatial axis, in latent positions."""

  size: int
  starts: tuple[int, ...]
  extents: tuple[int, ...]  # equal to the tile except for truncated edge tiles
  blend: int  # overlap width over which tile k fades in over tile k-1

  def end(self, k: int) -> int:
    """Where tile k's crop ends: at the next tile's start (the stride, for all but a
    shifted or last tile), the last one at the border."""
    return self.starts[k + 1] if k + 1 < len(self.starts) else self.size


def _axis(size: int, tile: int, stride: int, edges: str) -> _Axis:
  if size <= tile:
    return _Axis(size, (0,), (size,), 0)
  if edges == "shift":
    starts = tuple(range(0, size - tile, stride)) + (size - tile,)
  else:  # diffusers: a tile at every multiple of the stride below the size
    starts = tuple(range(0, size, stride))
  return _Axis(size, starts, tuple(min(tile, size - s) for s in starts), tile - stride)


def _geometry(model, tile: int, overlap: float, edges: str) -> tuple[int, int, int]:
  """(downsampling factor f, tile and stride in latent positions), checked."""
  factor = model.spec.downsample_factor
  if edges not in EDGES:
    raise ValueError(f"edges must be one of {EDGES}, got {edges!r}")
  if tile <= 0 or tile % factor:
    raise ValueError(f"tile must be a positive multiple of the model's downsampling factor "
                     f"{factor} (it is in sample pixels), got {tile}")
  # Above one half a tile's leading and trailing ramps would overlap each other, and the
  # in-place blending order would read ramps that are already blended.
  if not 0.0 <= overlap <= 0.5:
    raise ValueError(f"overlap must be in [0, 0.5], got {overlap}")
  latent_tile = tile // factor
  stride = int(latent_tile * (1 - overlap))  # diffusers' rounding
  return factor, latent_tile, max(stride, 1)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _step(graphdef, method: str, state, x):
  """One tile through `model.<method>`. The weights are an argument, not constants, and
  the graph definition is static, so every tile of one shape (and every later call on the
  same model) reuses one compiled program."""
  return getattr(nnx.merge(graphdef, state), method)(x)


def _ramp(n: int, dtype) -> tuple[np.ndarray, np.ndarray]:
  """(weight of the earlier tile, weight of the later one) over an n-wide overlap:
  1 - y/n and y/n for y = 0..n-1, computed in float64 and rounded once, as diffusers'
  Python-scalar arithmetic on float32 tensors does."""
  later = np.arange(n, dtype=np.float64) / n
  return (1.0 - later).astype(dtype), later.astype(dtype)


def _blend(earlier: np.ndarray, later: np.ndarray, offset: int, extent: int, axis: int):
  """Fades `later` in over `earlier` on `later`'s first `extent` positions along `axis`,
  in place; `offset` is where `later` starts inside `earlier`."""
  if extent <= 0:
    return
  keep, take = _ramp(extent, later.dtype)
  shape = [1] * later.ndim
  shape[axis] = extent
  head = [slice(None)] * later.ndim
  head[axis] = slice(0, extent)
  tail = list(head)
  tail[axis] = slice(offset, offset + extent)
  head, tail = tuple(head), tuple(tail)
  later[head] = earlier[tail] * keep.reshape(shape) + later[head] * take.reshape(shape)


def _tiled(model, method: str, x, tile: int, overlap: float, edges: str):
  factor, latent_tile, stride = _geometry(model, tile, overlap, edges)
  # Input and output scales relative to latent positions.
  scale_in, scale_out = (factor, 1) if method == "encode" else (1, factor)
  graphdef, state = nnx.split(model)
  height, width = x.shape[1], x.shape[2]
  if height <= latent_tile * scale_in and width <= latent_tile * scale_in:
    return _step(graphdef, method, state, jnp.asarray(x))  # one tile: the plain call
  if height % scale_in or width % scale_in:
    raise ValueError(f"tiled encoding needs an image whose sides are multiples of the "
                     f"downsampling factor {factor}, got {height}x{width}")
  rows = _axis(height // scale_in, latent_tile, stride, edges)
  cols = _axis(width // scale_in, latent_tile, stride, edges)
  x = np.asarray(x)  # tiles are cut on the host; only one at a time goes to the device

  out, treedef, above = None, None, None
  for i, (top, tile_h) in enumerate(zip(rows.starts, rows.extents)):
    row = []
    for j, (left, tile_w) in enumerate(zip(cols.starts, cols.extents)):
      window = x[:, top * scale_in:(top + tile_h) * scale_in,
                 left * scale_in:(left + tile_w) * scale_in]
      leaves, treedef = jax.tree.flatten(_step(graphdef, method, state, window))
      leaves = [np.array(leaf, dtype=np.float32) for leaf in leaves]  # writable host copies
      if out is None:
        out = [np.empty((leaf.shape[0], rows.size * scale_out, cols.size * scale_out)
                        + leaf.shape[3:], np.float32) for leaf in leaves]
      for k, leaf in enumerate(leaves):
        # diffusers' blend extent: min(earlier, later, overlap), in output positions.
        if i:
          _blend(above[j][k], leaf, (top - rows.starts[i - 1]) * scale_out,
                 min(rows.blend, tile_h, rows.extents[i - 1]) * scale_out, axis=1)
        if j:
          _blend(row[j - 1][k], leaf, (left - cols.starts[j - 1]) * scale_out,
                 min(cols.blend, tile_w, cols.extents[j - 1]) * scale_out, axis=2)
        out[k][:, top * scale_out:rows.end(i) * scale_out,
               left * scale_out:cols.end(j) * scale_out] = (
                   leaf[:, :(rows.end(i) - top) * scale_out, :(cols.end(j) - left) * scale_out])
      row.append(leaves)
    above = row
  return jax.tree.unflatten(treedef, [jnp.asarray(o) for o in out])


def tiled_encode(model, x, tile: int, overlap: float = 0.25, edges: str = "shift"):
  """`model.encode(x)` computed on overlapping `tile` x `tile` pixel windows.

  Returns what `model.encode` returns: for AutoencoderKL a DiagonalGaussian whose mean and
  log-variance (the moments the encoder produces) are each blended, for VQModel the
  pre-quantization latent (quantization is per position, so it commutes with tiling).
  One nuance against diffusers, which blends the raw moments and clips the log-variance
  to [-30, 20] afterwards: here each tile's log-variance is already clipped (by
  `model.encode`) when blended, which differs only where an encoder's raw log-variance
  leaves that range inside an overlap. An image no larger than a tile is encoded whole.
  `x` is NHWC with sides that are multiples of the model's downsampling factor.
  """
  return _tiled(model, "encode", x, tile, overlap, edges)


def tiled_decode(model, z, tile: int, overlap: float = 0.25, edges: str = "shift"):
  """`model.decode(z)` computed on overlapping latent windows of `tile` sample pixels
  (`tile / f` latent positions), blended over the overlap; the same result type. A VQ
  model quantizes each window, which is what quantizing the whole latent gives. A latent
  no larger than a tile is decoded whole."""
  return _tiled(model, "decode", z, tile, overlap, edges)


def lower_tile(model, shape: tuple[int, ...], tile: int, method: str = "decode",
               overlap: float = 0.25, dtype: Any = jnp.float32) -> jax.stages.Lowered:
  """The largest per-tile computation `tiled_<method>` runs on an input of `shape`
  (NHWC), lowered: `.compile().memory_analysis()` says what a tile size costs on a
  device before any image is decoded, to pick the largest tile that fits. When the input
  fits in one tile this is the plain call on the whole input."""
  _, latent_tile, _ = _geometry(model, tile, overlap, "shift")
  window = latent_tile * (model.spec.downsample_factor if method == "encode" else 1)
  tile_shape = (shape[0], min(shape[1], window), min(shape[2], window)) + tuple(shape[3:])
  graphdef, state = nnx.split(model)
  return _step.lower(graphdef, method, state, jax.ShapeDtypeStruct(tile_shape, dtype))
