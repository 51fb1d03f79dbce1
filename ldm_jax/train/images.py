"""Image grids written as PNG files next to the TensorBoard logs."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def save_grid(image: np.ndarray, path: str) -> None:
  """Writes a uint8 HxWx3 image atomically (a viewer never sees half a PNG)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp.png"
  Image.fromarray(image).save(tmp)
  os.replace(tmp, path)
