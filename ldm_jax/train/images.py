"""Sample images as PNG files: grids laid out for their count (the trainers' images/, the
sampling command), or one file per image."""

from __future__ import annotations

import math

import numpy as np

from ldm_jax import fs, outputs


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Images in [-1, 1] as uint8, rounded."""
  return np.clip((np.asarray(images) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def grid_columns(n: int) -> int:
  """Columns for a grid of n images: the smallest divisor of n that is at least sqrt(n),
  so every cell holds an image and the grid is at least as wide as tall (1 -> 1x1, 2 ->
  2x1, 6 -> 3x2, 8 -> 4x2, 16 -> 4x4). When that layout is a strip, more than 8 columns
  and more than 3 times as many columns as rows (11, 13, 17, 22, 26, ... images), the
  grid takes ceil(sqrt(n)) columns instead, its last row short by fewer than that."""
  if n < 1:
    raise ValueError(f"a grid needs at least one image, got {n}")
  root = math.isqrt(n - 1) + 1  # ceil(sqrt(n))
  columns = next(c for c in range(root, n + 1) if n % c == 0)
  if columns <= 8 or columns <= 3 * (n // columns):
    return columns
  return root


def grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
  """[N, H, W, C] in [-1, 1] -> one uint8 image, row by row, `columns` wide (default
  `grid_columns(N)`); cells past the last image are black."""
  images = to_uint8(images)
  n, h, w, c = images.shape
  columns = grid_columns(n) if columns is None else columns
  rows = -(-n // columns)
  padded = np.zeros((rows * columns, h, w, c), np.uint8)
  padded[:n] = images
  return padded.reshape(rows, columns, h, w, c).transpose(0, 2, 1, 3, 4).reshape(
      rows * h, columns * w, c)


def save_grid(image: np.ndarray, path: str, *, overwrite: bool = True) -> None:
  """Writes a uint8 HxWx3 image atomically (a viewer never sees half a PNG), marked as an
  ldm_jax sample grid.

  The trainers write into their own workdir's images/ (a resumed run may redo a step's
  grid, so by default any file there is replaced); the sampling command passes its
  --overwrite, so that a PNG ldm_jax did not write is kept.
  """
  outputs.write_png(path, image, outputs.SAMPLES, overwrite=overwrite)


def check_grid_path(path: str, *, overwrite: bool = False) -> str:
  """Where the sampling command's grid goes, checked before sampling: a .png file path
  that can be created (or replaced: see ldm_jax.outputs); returned absolute (a gs:// URL
  as it is)."""
  if fs.isdir(path):
    raise outputs.OutputError(f"--out={path} is a folder; give the grid's file name, e.g. "
                              f"--out={fs.join(path, 'samples.png')}")
  if not path.lower().endswith(".png"):
    raise outputs.OutputError(f"--out={path}: the grid is a PNG file; give a path ending "
                              "in .png")
  outputs.check_target(path, outputs.SAMPLES, overwrite=overwrite)
  return fs.absolute(path)


def check_samples_folder(path: str, *, overwrite: bool = False) -> str:
  """Where the sampling command's single images go (--individual, or --out naming a
  folder), checked before sampling: a folder written whole, replacing a previous one of
  samples (see ldm_jax.outputs); returned absolute."""
  if path.lower().endswith(".png") and not fs.isdir(path):
    raise outputs.OutputError(f"--out={path}: one PNG per image goes into a folder; give "
                              "a folder path, not a .png file")
  outputs.check_target(path.rstrip("/") or path, outputs.SAMPLES, overwrite=overwrite)
  return fs.absolute(path.rstrip("/") or path)
