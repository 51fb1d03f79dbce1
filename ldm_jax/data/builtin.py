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
# What each photo shows, for text-conditioned demos; a tile's label is its photo's index.
CAPTIONS = {
    "astronaut.png": "a portrait of an astronaut in a white spacesuit in front of a flag",
    "chelsea.png": "a ginger tabby cat looking to the side",
    "coffee.png": "a cup of coffee on a saucer seen from above",
    "hubble_deep_field.jpg": "galaxies scattered across the black of deep space",
    "ihc.png": "a stained tissue section under a microscope",
    "motorcycle_left.png": "a motorcycle parked in a workshop",
    "motorcycle_right.png": "a motorcycle parked in a workshop",
    "retina.jpg": "a photograph of the retina with red blood vessels",
    "rocket.jpg": "a rocket standing on its launch pad under a blue sky",
    "camera.png": "a black and white photo of a man with a camera on a tripod",
    "coins.png": "a black and white photo of old coins on a dark background",
    "brick.png": "a black and white photo of a brick wall",
    "grass.png": "a black and white photo of grass",
    "gravel.png": "a black and white photo of gravel",
    "moon.png": "a black and white photo of the cratered surface of the moon",
}
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


def load_tiles(split: str) -> tuple[np.ndarray, ...]:
  """All tiles of `split` ("train" or "validation") in a fixed order; cached per process."""
  return _load(split)[0]


def tile_photos(split: str) -> tuple[str, ...]:
  """The photo each tile of `split` comes from (its class and its caption)."""
  return _load(split)[1]


@functools.cache
def _load(split: str) -> tuple[tuple[np.ndarray, ...], tuple[str, ...]]:
  if split not in SPLITS:
    raise ValueError(f"the builtin source has splits {SPLITS}, not {split!r}")
  out, names = [], []
  for name in PHOTOS:
    if (name in VALIDATION_PHOTOS) != (split == "validation"):
      continue
    path = photo_dir() / name
    if not path.is_file():  # an unusual scikit-image build; the rest still works
      logging.warning("builtin data: %s is missing from scikit-image's data folder", name)
      continue
    with path.open("rb") as f, Image.open(f) as photo:
      cut = tiles(photo)
    out.extend(cut)
    names.extend([name] * len(cut))
  for tile in out:
    tile.flags.writeable = False  # shared by every reader of the cache
  return tuple(out), tuple(names)


class BuiltinSource:
  """Random access to the tiles of one split: {"image": uint8 [128, 128, 3], "label": the
  photo's index in PHOTOS, "caption": its CAPTIONS entry}.

  Only the split name is pickled; grain worker processes rebuild the tiles themselves.
  """

  def __init__(self, split: str):
    if split not in SPLITS:
      raise ValueError(f"the builtin source has splits {SPLITS}, not {split!r}")
    self.split = split

  def __len__(self) -> int:
    return len(load_tiles(self.split))

  def __getitem__(self, index: int) -> dict:
    tiles_, names = _load(self.split)
    name = names[index]
    return {"image": tiles_[index], "label": PHOTOS.index(name), "caption": CAPTIONS[name]}

  def __repr__(self) -> str:
    return f"BuiltinSource({self.split!r})"
