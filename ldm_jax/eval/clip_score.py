"""CLIP score of images against their captions (Hessel et al. 2021; as torchmetrics'
`CLIPScore` reports it): 100 * cos(image embedding, text embedding) per pair, averaged
over the pairs, then clamped at 0.

The clamp is torchmetrics': it applies to the *mean* (`max(sum / n, 0)`), not to each
pair as the paper's CLIP-S (`2.5 * max(cos, 0)`) does. With a trained CLIP the two agree,
since matched pairs score well above 0; `per_sample` values here are the unclamped
cosines x 100, so either can be taken from them.

Images come as they leave a sampler: NHWC in [-1, 1], on device. They are prepared in
JAX as transformers' CLIPImageProcessor prepares a PIL image: quantized to 8 bits (what
saving a sample does), the shorter side resized to `size.shortest_edge` with antialiased
bicubic (PIL's filter: Keys a = -0.5, support scaled when shrinking) in PIL's two 8-bit
passes, center-cropped to `crop_size` (offsets floored), scaled to [0, 1] and normalized with the mean / std of the folder's preprocessor_config.json (OpenAI's
CLIP values without one). Captions are tokenized with the CLIP folder's own tokenizer, not
the run's: an LDM may condition on a different text encoder.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ldm_jax import fs
from ldm_jax.eval.streaming import MeanStd, to_host

# transformers' image_utils.OPENAI_CLIP_MEAN / OPENAI_CLIP_STD (the openai CLIP training set).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_CONFIG = "preprocessor_config.json"
# PIL resampling codes in preprocessor configs -> jax.image.resize methods (both antialias
# when shrinking; PIL's LANCZOS is lanczos3).
_RESAMPLE = {0: "nearest", 1: "lanczos3", 2: "linear", 3: "cubic"}


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """CLIPImageProcessor's steps for images in [-1, 1] (hashable: a static jit argument)."""

  shortest_edge: int = 224  # 0: no resize
  crop: tuple[int, int] = (224, 224)  # (height, width); (0, 0): no crop
  mean: tuple[float, ...] = OPENAI_CLIP_MEAN
  std: tuple[float, ...] = OPENAI_CLIP_STD
  method: str = "cubic"
  quantize: bool = True

  def resized_size(self, height: int, width: int) -> tuple[int, int]:
    """transformers' `get_resize_output_image_size(default_to_square=False)`: the shorter
    side becomes shortest_edge, the longer one scales with it, truncated."""
    if not self.shortest_edge:
      return height, width
    short, long = min(height, width), max(height, width)
    new_long = int(self.shortest_edge * long / short)
    return (new_long, self.shortest_edge) if width <= height else (self.shortest_edge, new_long)

  def __call__(self, images: jax.Array) -> jax.Array:
    b, h, w, c = images.shape
    x = (jnp.clip(images.astype(jnp.float32), -1.0, 1.0) + 1.0) * 127.5
    if self.quantize:
      x = _to_8bit(x)
    nh, nw = self.resized_size(h, w)
    resize = lambda x, shape: jax.image.resize(x, shape, method=self.method, antialias=True)
    if self.quantize:
      # PIL resamples an 8-bit image in two passes, horizontal then vertical, saturating
      # and rounding to 8 bits after each; doing the same matches it to within one level
      # on a fraction of a percent of pixels (one float pass is ~3 levels off in places).
      if nw != w:
        x = _to_8bit(resize(x, (b, h, nw, c)))
      if nh != h:
        x = _to_8bit(resize(x, (b, nh, nw, c)))
    elif (nh, nw) != (h, w):  # PIL copies an image resized to its own size
      x = jnp.clip(resize(x, (b, nh, nw, c)), 0.0, 255.0)
    ch, cw = self.crop
    if ch and cw:
      if ch > nh or cw > nw:
        # transformers pads such an image; a CLIP model folder never asks for it.
        raise ValueError(f"CLIP crop {ch}x{cw} is larger than the resized image {nh}x{nw}")
      top, left = (nh - ch) // 2, (nw - cw) // 2
      x = x[:, top:top + ch, left:left + cw]
    mean = jnp.asarray(self.mean, jnp.float32)
    std = jnp.asarray(self.std, jnp.float32)
    return (x / 255.0 - mean) / std

  @classmethod
  def from_folder(cls, folder, image_size: int) -> "Preprocess":
    """The folder's preprocessor_config.json, or CLIP's defaults at the tower's size."""
    default = cls(shortest_edge=image_size, crop=(image_size, image_size))
    path = fs.join(os.fspath(folder), PREPROCESSOR_CONFIG)
    if not fs.isfile(path):
      return default
    try:
      cfg = json.loads(fs.read_text(path))
    except ValueError as err:
      raise ValueError(f"{path} is not valid JSON: {err}") from err
    size = cfg.get("size", image_size)
    if isinstance(size, dict):
      if "shortest_edge" in size:
        size = size["shortest_edge"]
      elif size.get("height") == size.get("width") and size.get("height"):
        size = size["height"]  # a square resize of a square sample is the same
      else:
        raise ValueError(f"{path}: size={size} is not supported; expected shortest_edge")
    crop = cfg.get("crop_size", image_size)
    crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
    resample = cfg.get("resample", 3)
    if resample not in _RESAMPLE:
      raise ValueError(f"{path}: resample={resample} is not supported; choose one of "
                       f"{sorted(_RESAMPLE)} (PIL codes)")
    out = cls(
        shortest_edge=int(size) if cfg.get("do_resize", True) else 0,
        crop=tuple(int(v) for v in crop) if cfg.get("do_center_crop", True) else (0, 0),
        mean=tuple(float(v) for v in cfg.get("image_mean", OPENAI_CLIP_MEAN)),
        std=tuple(float(v) for v in cfg.get("image_std", OPENAI_CLIP_STD)),
        method=_RESAMPLE[resample])
    if not cfg.get("do_normalize", True):
      out = dataclasses.replace(out, mean=(0.0,) * 3, std=(1.0,) * 3)
    if out.crop != (image_size, image_size):
      raise ValueError(f"{path}: crop_size {out.crop} differs from the image tower's "
                       f"{image_size}x{image_size} input")
    return out


def _to_8bit(x: jax.Array) -> jax.Array:
  """Saturated and rounded half up, as PIL stores a filter's output."""
  return jnp.floor(jnp.clip(x, 0.0, 255.0) + 0.5)


@functools.partial(jax.jit, static_argnums=(0, 2, 5))
def _scores(text_def, text_state, vision_def, vision_state, images, preprocess, ids):
  image_embeds = nnx.merge(vision_def, vision_state).encode(preprocess(images)).embeds
  text_embeds = nnx.merge(text_def, text_state).encode(ids).embeds
  unit = lambda e: e / jnp.linalg.norm(e, axis=-1, keepdims=True)
  return 100.0 * jnp.sum(unit(image_embeds) * unit(text_embeds), axis=-1)


def clip_score(values: MeanStd) -> float:
  """torchmetrics' aggregate: the mean of the per-sample scores, clamped at 0."""
  return max(values.mean(), 0.0)


class CLIPScorer:
  """A CLIP model's two towers (replicated over `mesh` when given), its tokenizer and image
  preprocessing: `scores(images, ids)` -> per-sample 100 * cos, on the host."""

  def __init__(self, parts, tokenizer, preprocess: Preprocess, mesh=None, source: str = ""):
    from ldm_jax import mesh as mesh_lib
    self.text_spec, self.vision_spec = parts.text_spec, parts.vision_spec
    self.tokenizer = tokenizer
    self.preprocess = preprocess
    self.source = source
    put = ((lambda s: jax.device_put(s, mesh_lib.replicated(mesh))) if mesh is not None
           else (lambda s: s))
    self.text_def, self.text_state = nnx.graphdef(parts.text), put(nnx.state(parts.text))
    self.vision_def, self.vision_state = (nnx.graphdef(parts.vision),
                                          put(nnx.state(parts.vision)))

  def tokenize(self, captions: Sequence[str]) -> np.ndarray:
    """int32 [n, max_length] ids of this CLIP's tokenizer (np arrays of str or bytes too)."""
    return self.tokenizer([c for c in np.asarray(captions, dtype=object).reshape(-1)])

  def scores(self, images: jax.Array, ids) -> np.ndarray:
    """100 * cos(image, text) per pair (unclamped), float32 [B], for global `images` in
    [-1, 1] and `ids` of the same batch (a global array on several hosts)."""
    return to_host(_scores(self.text_def, self.text_state, self.vision_def, self.vision_state,
                           images, self.preprocess, jnp.asarray(ids, jnp.int32)
                           if isinstance(ids, np.ndarray) else ids))

  def score(self, images: jax.Array, captions: Sequence[str]) -> np.ndarray:
    """`scores` with the captions tokenized here (one host)."""
    return self.scores(images, self.tokenize(captions))


def find_tokenizer(folder) -> str:
  """The CLIP folder itself when it holds vocab.json + merges.txt, else its tokenizer/
  subfolder, else a tokenizer/ folder beside it (a pipeline's text_encoder/ and
  tokenizer/)."""
  folder = os.fspath(folder).rstrip("/")
  parent = os.path.dirname(folder) if not fs.is_remote(folder) else folder.rsplit("/", 1)[0]
  candidates = (folder, fs.join(folder, "tokenizer"), fs.join(parent, "tokenizer"))
  for candidate in candidates:
    if all(fs.isfile(fs.join(candidate, f)) for f in ("vocab.json", "merges.txt")):
      return candidate
  raise FileNotFoundError(f"no CLIP tokenizer (vocab.json + merges.txt) for {folder}: looked "
                          f"in {', '.join(candidates)}")


def load_clip_scorer(path: str | os.PathLike, mesh=None, *, dtype: str = "float32"
                     ) -> CLIPScorer:
  """A scorer from a transformers `CLIPModel` folder (config.json with text_config and
  vision_config, model.safetensors), its tokenizer files (in it or a tokenizer/ folder in
  or beside it) and its preprocessor_config.json when present."""
  from ldm_jax.convert.clip_vision import load_clip_model
  from ldm_jax.data.tokenizer import CLIPTokenizer
  parts = load_clip_model(path, dtype=dtype)
  tokenizer = CLIPTokenizer.from_folder(find_tokenizer(path))
  if tokenizer.max_length > parts.text_spec.max_positions:
    tokenizer = CLIPTokenizer.from_folder(find_tokenizer(path),
                                          max_length=parts.text_spec.max_positions)
  preprocess = Preprocess.from_folder(path, parts.vision_spec.image_size)
  return CLIPScorer(parts, tokenizer, preprocess, mesh, source=os.fspath(path))
