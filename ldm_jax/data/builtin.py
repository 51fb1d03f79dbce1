"""Real photographs that ship offline: scikit-image's bundled sample images, cut into tiles.

Datasets cannot be downloaded on every machine this code runs on (CI, air-gapped clusters),
yet a demo or a test should train on real photographs, not noise: their statistics are
what an autoencoder is for. scikit-image installs a few dozen of them with the package.
The files are read straight from `skimage/data/`; `skimage.data.<name>()` is not used
because for some images it fetches from the network.

Each photo is resized so that its shorter side is 256 pixels and cut into non-overlapping
128x128 tiles (the grid is centered), which gives 64 tiles. All tiles of two photos form
the validation split, so no validation tile shares a photo with a training tile.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging

import numpy as np
from PIL import Image

SHORT_SIDE = 256
TILE = 128
# Color photos, then grayscale ones (converted to RGB): file names inside skimage/data/.
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
          "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg",
          "camera.png", "coins.png", "brick.png", "grass.png", "gravel.png", "moon.png")
VALIDATION_PHOTOS = ("chelsea.png", "rocket.jpg")
SPLITS = ("train", "validation")


def photo_dir():
  """skimage/data/ inside the installed package (importing only the top-level package)."""
  return importlib.resources.files("skimage") / "data"


def tiles(photo: Image.Image) -> list[np.ndarray]:
  """A photo's tiles, row-major, as uint8 [TILE, TILE, 3] arrays."""
  photo = photo.convert("RGB")
  scale = SHORT_SIDE / min(photo.size)
  width, height = (max(SHORT_SIDE, round(s * scale)) for s in photo.size)
  pixels = np.asarray(photo.resize((width, height), Image.Resampling.BICUBIC))
  rows, cols = height // TILE, width // TILE
  top, left = (height - rows * TILE) // 2, (width - cols * TILE) // 2
  return [np.ascontiguousarray(pixels[top + r * TILE:top + (r + 1) * TILE,
                                      left + c * TILE:left + (c + 1) * TILE])
          for r in range(rows) for c in range(cols)]


@functools.cache
def load_tiles(split: str) -> tuple[np.ndarray, ...]:
  """All tiles of `split` ("train" or "validation") in a fixed order; cached per process."""
  if split not in SPLITS:
    raise ValueError(f"the builtin source has splits {SPLITS}, not {split!r}")
  out = []
  for name in PHOTOS:
    if (name in VALIDATION_PHOTOS) != (split == "validation"):
      continue
    path = photo_dir() / name
    if not path.is_file():  # an unusual scikit-image build; the rest still works
      logging.warning("builtin data: %s is missing from scikit-image's data folder", name)
      continue
    with path.open("rb") as f, Image.open(f) as photo:
      out.extend(tiles(photo))
  for tile in out:
    tile.flags.writeable = False  # shared by every reader of the cache
  return tuple(out)


class BuiltinSource:
  """Random access to the tiles of one split: uint8 [128, 128, 3] arrays.

  Only the split name is pickled; grain worker processes rebuild the tiles themselves.
  """

  def __init__(self, split: str):
    if split not in SPLITS:
      raise ValueError(f"the builtin source has splits {SPLITS}, not {split!r}")
    self.split = split

  def __len__(self) -> int:
    return len(load_tiles(self.split))

  def __getitem__(self, index: int) -> np.ndarray:
    return load_tiles(self.split)[index]

  def __repr__(self) -> str:
    return f"BuiltinSource({self.split!r})"
