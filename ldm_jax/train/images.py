"""Image grids written as PNG files next to the TensorBoard logs."""

from __future__ import annotations

import numpy as np

from ldm_jax import fs, outputs


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
