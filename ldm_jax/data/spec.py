"""`DataSpec`: every data setting, read once from a config's `data` block.

The run's entry points (the trainers' `build_run`, the evaluators, `cache_latents`,
`reference_stats`, the benchmarks) call `DataSpec.from_config(config.data)`; below them
the data functions take the spec, never the ConfigDict. So the defaults for configs saved
before a key existed, the value checks and the unknown-key check live here only, and the
known keys are the dataclass's fields: a key cannot be read in one place and missing from
the list in another.

Fields (the names of the `config.data` keys):
  source        "builtin" | "folder" | "arrayrecord" | "tfds"
  path          folder: a directory of images; arrayrecord: a file or glob of ArrayRecord
                files, "{split}" replaced by the split name; tfds: the dataset name
                ("imagenet2012", "my_set/config:1.0.0"); builtin: unused
  split         training split name ("train")
  val_split     held-out split name ("validation")
  image_size    output side; the shorter side is resized to it, then cropped square
  batch_size    global batch size (over all hosts and devices)
  random_crop   train: random square crop (else center crop)
  random_flip   train: horizontal flip with probability 1/2
  seed          picks the shuffle order and the augmentations
Added later, so with defaults for configs saved before them:
  num_workers   grain worker processes for the training stream (0: decode in threads of
                the training process)
  read_threads  threads that read and decode records ahead of use (default 8)
  val_fraction  share of the data held out as `val_split` when the data has no such split
                of its own (folder without a `val_split` subfolder, ArrayRecord path
                without "{split}"); default 0.05, at least one record
  data_dir      tfds: the TFDS data directory holding the prepared dataset ("" = TFDS's)
  image_key     tfds: the feature holding the image; arrayrecord: the key holding the
                encoded image in records that are msgpack maps (default "image")
  max_aspect_ratio  images whose longer side exceeds this many times the shorter are
                skipped, before decoding (default 4; see images.DEFAULT_MAX_ASPECT_RATIO)
  max_image_pixels  images with more pixels to decode (after JPEG's reduced-scale decoding)
                are skipped (default 89,478,485, PIL's MAX_IMAGE_PIXELS); above twice PIL's
                own limit PIL refuses the file whatever this says
  short_side    the shorter side images are resized to before the image_size crop (0:
                image_size itself, the reference's way). Larger keeps detail and makes
                random crops real crops: the built-in 128-pixel tiles at image_size 64 are
                otherwise 54 fixed thumbnails, memorized within a few hundred steps
  random_channel_order  train: the RGB channels in one of their 6 orders, drawn per
                example (default off). For small or colour-poor data (the built-in photos
                are few, warm or grey): an autoencoder should reproduce any colour, and
                this shows it blue skies a dozen warm photos never do
  download      tfds: download and prepare a dataset that is not prepared in data_dir
                (default True); False fails at once, naming how to prepare it elsewhere
  allow_empty_captions  a text-conditioned run on an image folder where no image has a
                `.txt` caption trains on empty captions: refused unless this is True
                (default False)

What needs the data itself (do the splits exist, do the files decode, is there a record
for every host) is checked by `sources.check_data`, not here: building a spec touches no
file, so sampling or exporting from a run whose data has moved still works.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ldm_jax.data import images

SOURCES = ("builtin", "folder", "arrayrecord", "tfds")

# Field annotations are strings (postponed evaluation); these turn a config value into
# the field's type, so `--config.data.image_size=64.0` or a JSON round trip reads the same.
_CASTS = {"str": str, "int": int, "float": float, "bool": bool}


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """The `data` block, typed and checked; see the module docstring for each field.

  Fields without a default were in every config ever saved; the others carry the value
  a config saved before the key existed behaves as. Construct with `from_config`, or
  `dataclasses.replace(spec, split=..., batch_size=...)` for a variant (checked again).
  """

  source: str
  path: str
  split: str
  val_split: str
  image_size: int
  batch_size: int
  random_crop: bool
  random_flip: bool
  seed: int
  num_workers: int = 0
  read_threads: int = 8
  val_fraction: float = 0.05
  data_dir: str = ""
  image_key: str = "image"
  max_aspect_ratio: float = images.DEFAULT_MAX_ASPECT_RATIO
  max_image_pixels: int = images.DEFAULT_MAX_IMAGE_PIXELS
  short_side: int = 0
  random_channel_order: bool = False
  download: bool = True
  allow_empty_captions: bool = False

  def __post_init__(self):
    # In __post_init__ rather than from_config, so dataclasses.replace is checked too.
    if self.source not in SOURCES:
      raise ValueError(f"unknown data.source {self.source!r}; choose one of "
                       f"{', '.join(SOURCES)} (--config.data.source=folder "
                       f"--config.data.path=/dir/of/images)")
    if self.image_size <= 0:
      raise ValueError(f"data.image_size must be positive, got {self.image_size}")
    if self.short_side and self.short_side < self.image_size:
      raise ValueError(f"data.short_side={self.short_side} is below data.image_size="
                       f"{self.image_size}: the crop must fit (0 resizes to image_size)")
    if self.batch_size < 1:
      raise ValueError(f"data.batch_size={self.batch_size} must be >= 1: it is the global "
                       "batch over all hosts and devices; set --config.data.batch_size to "
                       "a multiple of the number of devices")
    if self.num_workers < 0:
      raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
    if not 0.0 < self.val_fraction < 1.0:
      raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
    if not self.max_aspect_ratio >= 1.0:  # `not >=` also refuses NaN
      raise ValueError(f"data.max_aspect_ratio must be >= 1 (longer side / shorter side), "
                       f"got {self.max_aspect_ratio}")
    if self.max_image_pixels < 1:
      raise ValueError(f"data.max_image_pixels must be positive, got {self.max_image_pixels}")

  @classmethod
  def from_config(cls, block: Any) -> "DataSpec":
    """The spec of a `data` block (a ConfigDict or dict); unknown or missing keys fail."""
    values = dict(block or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
      raise ValueError(f"unknown config keys data.{unknown}; valid: {sorted(fields)}")
    missing = [name for name, f in fields.items()
               if name not in values and f.default is dataclasses.MISSING]
    if missing:
      raise ValueError(f"the data block lacks keys {missing} (they have no default)")
    out = {}
    for name, value in values.items():
      cast = _CASTS[fields[name].type]
      if value is None and cast is str:  # an unset path reads as ""
        value = ""
      try:
        out[name] = cast(value)
      except (TypeError, ValueError):
        raise ValueError(f"data.{name}={value!r} must be of type {fields[name].type}") from None
    return cls(**out)

  @property
  def resize_to(self) -> int:
    """The shorter side decoded images get, before the image_size crop."""
    return self.short_side or self.image_size

  def decode_limits(self) -> dict:
    """The `images.decode_resized` bounds (max_aspect_ratio, max_image_pixels)."""
    return dict(max_aspect_ratio=self.max_aspect_ratio, max_image_pixels=self.max_image_pixels)
