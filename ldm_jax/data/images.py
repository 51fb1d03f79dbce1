"""From a stored record to a model input: decode with PIL, make RGB, resize, crop, scale.

Kept apart from the grain wiring so that the same functions serve the training pipeline,
the evaluation pass and the up-front data check. Records come in three forms: encoded
bytes (ArrayRecord, TFDS with decoding skipped), a file path (image folders) or a uint8
array (the builtin tiles, TFDS with decoding); a dict record (TFDS) holds one of these
under `image_key`.

Bounded decoding: one odd file must not take a reader thread's memory (and there are 8
of them per process). Before anything is decoded, the header's size is checked: an aspect
ratio beyond `max_aspect_ratio` is skipped (the resized image is the output times the
aspect ratio: a 4000x1 strip at 256 would be 256 x 1,024,000 pixels, 786 MB), and so is a
source with more than `max_image_pixels` pixels to decode (after JPEG's `draft`, which
decodes at 1/2, 1/4 or 1/8 scale for free). Then the decoded source is box-reduced by an
integer factor to 2-3x the output (`REDUCING_GAP`) and converted to RGB in bands of rows,
so no full-size copy of it is ever made; the remaining bicubic resize is small.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image

from ldm_jax import fs

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

# Why a record is skipped; the pipeline counts each reason.
UNDECODABLE = "undecodable"
ASPECT_RATIO = "aspect ratio"
TOO_MANY_PIXELS = "too many pixels"
SKIP_REASONS = (UNDECODABLE, ASPECT_RATIO, TOO_MANY_PIXELS)

# 4:1 keeps every photographic format (4:3, 3:2, 16:9, 21:9 ~ 2.4:1) and 3:1 panoramas; a
# square crop of anything wider shows under a quarter of the image (a strip of a banner, a
# scrolling screenshot, a 360-degree panorama), and the resized array, which the crop is
# cut from, is at most 4 times the output.
DEFAULT_MAX_ASPECT_RATIO = 4.0
# PIL's own MAX_IMAGE_PIXELS (1 GiB / 4 / 3 ~ 89.5 MP; 341 MiB as PIL holds RGB, at 4
# bytes a pixel), beyond which PIL warns of a decompression bomb (at twice that it refuses
# to open the file, which is skipped the same way). Counted after JPEG's draft, so a
# 100 MP camera JPEG, decoded at 1/8 scale, still passes (PIL warns about it once).
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# Box-reduce to at least this many times the output before the bicubic resize (Pillow's
# `reducing_gap`; 2 is its `thumbnail` default). Against a bicubic resize of the full
# image, photos of 2000-3000 pixels at image_size 256 differ by under 1 gray level on
# average (at most 10-12), at image_size 32 by up to 3; the reduced copy holds 4-9 times
# the output's pixels. A gap of 3 would halve the error and double that copy.
REDUCING_GAP = 2.0

_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}  # the EXIF orientations, as ImageOps has them
_ORIENTATION = 0x0112


class SkippedImage(ValueError):
  """An image deliberately not decoded; `reason` is one of SKIP_REASONS."""

  def __init__(self, reason: str, detail: str):
    super().__init__(reason, detail)
    self.reason = reason
    self.detail = detail

  def __str__(self) -> str:
    return f"{self.reason}: {self.detail}"


def open_image(record: Any, image_key: str = "image") -> Image.Image:
  """A lazily decoded PIL image for any record form (raises if it is not an image)."""
  if isinstance(record, dict):
    record = record[image_key]
  if isinstance(record, np.ndarray):
    pixels = record[..., 0] if record.ndim == 3 and record.shape[-1] == 1 else record
    return Image.fromarray(np.ascontiguousarray(pixels))
  if isinstance(record, (str, os.PathLike)):
    record = fs.read_bytes(record)  # read whole (local or gs://): no handle outlives the call
  if isinstance(record, (bytes, bytearray, memoryview)):
    return Image.open(io.BytesIO(record))
  raise TypeError(f"cannot read an image from a record of type {type(record).__name__}")


def to_rgb(image: Image.Image) -> Image.Image:
  """RGB, upright; transparent pixels composited onto white (as a viewer shows them)."""
  orientation = _orientation(image)
  return _upright(_rgb(image, _is_wide(image)), orientation)


def _rgb(image: Image.Image, wide: bool) -> Image.Image:
  """RGB as stored. `wide`: 16/32-bit values above 255, scaled down (PIL would clip them)."""
  if image.mode == "RGB":
    return image
  if image.mode.startswith("I"):
    pixels = np.asarray(image, np.float64)
    if wide:
      pixels = pixels / 257.0
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
  if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, F


def _is_wide(image: Image.Image) -> bool:
  """Whether a 16/32-bit grayscale image is scaled down, decided once for the whole image."""
  return image.mode.startswith("I") and image.getextrema()[1] > 255


def _orientation(image: Image.Image) -> int:
  """The EXIF (or XMP) orientation, 1 when upright. PNG may hold it after the pixels, so
  PIL decodes the image to find it: call this only when it is going to be decoded."""
  return image.getexif().get(_ORIENTATION, 1)


def _upright(image: Image.Image, orientation: int) -> Image.Image:
  method = _TRANSPOSE.get(orientation)
  return image if method is None else image.transpose(method)


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
  """(width, height) with the shorter side equal to `short_side`, aspect ratio kept."""
  scale = short_side / min(width, height)
  return max(short_side, round(width * scale)), max(short_side, round(height * scale))


def reduced_rgb(image: Image.Image, factor: int, band_pixels: int) -> Image.Image:
  """RGB as stored, box-averaged over `factor` x `factor` blocks (a partial last block over
  what it has, as `Image.reduce` does).

  Converted in bands of about `band_pixels` source pixels: an RGBA or palette image made
  RGB whole would take three or four full-size copies of the source (to RGBA, a white
  canvas, the composite, RGB); a band at a time, each copy is a band's size. Conversion
  first, then averaging, so that colors average as the old full-size resize had them.
  """
  if image.mode == "RGB":  # nothing to convert: one reduced copy, or none
    return image.reduce(factor) if factor > 1 else image
  image.load()
  wide = _is_wide(image)
  width, height = image.size
  out = Image.new("RGB", (-(-width // factor), -(-height // factor)))
  rows = factor * max(1, band_pixels // (width * factor))  # whole blocks, at least one row
  for top in range(0, height, rows):
    band = _rgb(image.crop((0, top, width, min(height, top + rows))), wide)
    out.paste(band.reduce(factor) if factor > 1 else band, (0, top // factor))
  return out


def decode_resized(record: Any, short_side: int, image_key: str = "image", *,
                   max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
                   max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
  """uint8 [H, W, 3] with min(H, W) == short_side; raises on anything undecodable, and
  `SkippedImage` on an image whose shape or size is out of bounds (before decoding it).

  Large JPEGs are decoded at a reduced scale first (PIL's `draft`, never below the target
  size), other formats are box-reduced to REDUCING_GAP times the target; PIL's bicubic
  resize widens its kernel when shrinking, so the rest of the downscale is antialiased.
  Beyond the decoded source, memory stays within a few times the output: the reduced
  copy (at most a quarter of the source), conversion bands of about the output's size,
  and the result, at most `max_aspect_ratio` times the output.
  """
  try:
    return _decode_resized(record, short_side, image_key, max_aspect_ratio, max_image_pixels)
  except Image.DecompressionBombError as e:  # PIL's refusal: over 2 x its MAX_IMAGE_PIXELS
    raise SkippedImage(TOO_MANY_PIXELS, str(e)) from e


def _decode_resized(record: Any, short_side: int, image_key: str, max_aspect_ratio: float,
                    max_image_pixels: int) -> np.ndarray:
  image = open_image(record, image_key)
  width, height = image.size
  if min(width, height) < 1 or max(width, height) > max_aspect_ratio * min(width, height):
    raise SkippedImage(ASPECT_RATIO, f"{width}x{height} pixels is "
                       f"{max(width, height) / max(1, min(width, height)):.1f}:1, beyond "
                       f"data.max_aspect_ratio={max_aspect_ratio:g}")
  image.draft(None, resized_size(width, height, short_side))  # JPEG only; others ignore it
  width, height = image.size
  if width * height > max_image_pixels:
    raise SkippedImage(TOO_MANY_PIXELS, f"{width}x{height} = {width * height:,} pixels to "
                       f"decode, more than data.max_image_pixels={max_image_pixels:,}")
  orientation = _orientation(image)
  factor = max(1, int(min(width, height) / short_side / REDUCING_GAP))
  reduced = reduced_rgb(image, factor, band_pixels=short_side * short_side)
  del image  # the decoded source: not needed once reduced
  upright = _upright(reduced, orientation)
  turned = orientation in (5, 6, 7, 8)
  size = resized_size(*((height, width) if turned else (width, height)), short_side)
  if factor > 1 or upright.size != size:
    box = _upright_box(reduced.size, (width / factor, height / factor), orientation)
    upright = upright.resize(size, Image.Resampling.BICUBIC, box=box)
  return np.asarray(upright)


def _upright_box(size: tuple[int, int], extent: tuple[float, float],
                 orientation: int) -> tuple[float, float, float, float]:
  """Where the source lies in its reduced copy (`size`) once turned upright.

  `Image.reduce` rounds up, so as stored the source covers `extent` from the top left
  and the last column and row hold partial blocks; turning the copy upright moves that
  slack to other sides, and the resize must leave it out to keep the geometry exact.
  """
  (w, h), (a, b) = size, extent
  dx, dy = w - a, h - b
  return {2: (dx, 0, w, b), 3: (dx, dy, w, h), 4: (0, dy, a, h), 5: (0, 0, b, a),
          6: (dy, 0, h, a), 7: (dy, dx, h, w), 8: (0, dx, b, w)}.get(orientation, (0, 0, a, b))


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
