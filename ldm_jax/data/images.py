"""From a stored record to a model input: decode with PIL, make RGB, resize, crop, scale.

Kept apart from the grain wiring so that the same functions serve the training pipeline,
the evaluation pass and the up-front data check. Records come in three forms: encoded
bytes (ArrayRecord, TFDS with decoding skipped), a file path (image folders) or a uint8
array (the builtin tiles, TFDS with decoding); a dict record (TFDS) holds one of these
under `image_key`.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image, ImageOps

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def open_image(record: Any, image_key: str = "image") -> Image.Image:
  """A lazily decoded PIL image for any record form (raises if it is not an image)."""
  if isinstance(record, dict):
    record = record[image_key]
  if isinstance(record, np.ndarray):
    pixels = record[..., 0] if record.ndim == 3 and record.shape[-1] == 1 else record
    return Image.fromarray(np.ascontiguousarray(pixels))
  if isinstance(record, (str, os.PathLike)):
    with open(record, "rb") as f:  # read whole, so no file handle outlives the call
      record = f.read()
  if isinstance(record, (bytes, bytearray, memoryview)):
    return Image.open(io.BytesIO(record))
  raise TypeError(f"cannot read an image from a record of type {type(record).__name__}")


def to_rgb(image: Image.Image) -> Image.Image:
  """RGB, upright; transparent pixels composited onto white (as a viewer shows them)."""
  image = ImageOps.exif_transpose(image)  # cameras store the rotation in EXIF
  if image.mode == "RGB":
    return image
  if image.mode.startswith("I"):  # 16/32-bit grayscale: PIL would clip to 255, not scale
    pixels = np.asarray(image, np.float64)
    if pixels.max(initial=0) > 255:
      pixels = pixels / 257.0
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
  if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, F


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
  """(width, height) with the shorter side equal to `short_side`, aspect ratio kept."""
  scale = short_side / min(width, height)
  return max(short_side, round(width * scale)), max(short_side, round(height * scale))


def decode_resized(record: Any, short_side: int, image_key: str = "image") -> np.ndarray:
  """uint8 [H, W, 3] with min(H, W) == short_side; raises on anything undecodable.

  Large JPEGs are decoded at a reduced scale first (PIL's `draft`, never below the target
  size), which makes decoding ImageNet-sized photos several times faster. PIL's bicubic
  resize widens its kernel when shrinking, so downscaling is antialiased.
  """
  image = open_image(record, image_key)
  image.draft(None, resized_size(*image.size, short_side))
  image = to_rgb(image)
  size = resized_size(*image.size, short_side)
  if image.size != size:
    image = image.resize(size, Image.Resampling.BICUBIC)
  return np.asarray(image)


def center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
  top, left = (pixels.shape[0] - size) // 2, (pixels.shape[1] - size) // 2
  return pixels[top:top + size, left:left + size]


def random_crop(pixels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  top = int(rng.integers(0, pixels.shape[0] - size + 1))
  left = int(rng.integers(0, pixels.shape[1] - size + 1))
  return pixels[top:top + size, left:left + size]


def to_float(pixels: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1], the range the autoencoders are trained in."""
  return np.ascontiguousarray(pixels, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)
