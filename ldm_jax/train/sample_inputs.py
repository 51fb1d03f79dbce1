"""The inputs a sampling request gives, checked against the model before anything compiles.

The sampling command (`ldm_jax.sample`) and anything else that samples from a workdir share
these: the condition fields (a class id or a prompt) and the concat fields (a low-res image,
or an image and its mask). Errors are ValueErrors that name the flag to change.
"""

from __future__ import annotations

from ldm_jax import fs


def condition_fields(config, num: int, class_id: int | None, prompt: str | None) -> dict:
  """The batch of condition fields the flags ask for, checked against the model's kind."""
  import numpy as np
  from ldm_jax.train.ldm_setup import tokenizer
  kind = config.cond.kind
  if kind == "class":
    if class_id is None:
      raise ValueError("this model is class-conditional: pass --class_id=N")
    if not 0 <= class_id < config.cond.num_classes:
      raise ValueError(f"--class_id must be in [0, {config.cond.num_classes})")
    return {"label": np.full((num,), class_id, np.int32)}
  if kind in ("text", "clip"):  # clip: an SD fine-tune, tokenized by its pipeline
    if prompt is None:
      raise ValueError("this model is text-conditional: pass --prompt=TEXT")
    return {"tokens": np.repeat(tokenizer(config)([prompt]), num, axis=0)}
  if class_id is not None or prompt is not None:
    raise ValueError("this model is unconditional: drop --class_id / --prompt")
  return {}


def read_image(path: str, mode: str):
  """A PNG/JPEG as float32 in [0, 1], in PIL `mode` ("RGB" or "L")."""
  import numpy as np
  from PIL import Image
  if not fs.isfile(path):
    raise ValueError(f"{path} not found")
  try:
    with fs.open(path, "rb") as f, Image.open(f) as im:
      return np.asarray(im.convert(mode), np.float32) / 255.0
  except OSError as e:
    raise ValueError(f"cannot read {path} as an image: {e}") from None


def concat_fields(config, spec, num: int, image: str | None, mask: str | None) -> dict:
  """The concat inputs the flags give (a low-res image, or an image and its mask), checked
  against the model's `cond.concat` and sizes before anything compiles."""
  import numpy as np
  from ldm_jax.train.concat import ConcatSpec
  from ldm_jax.train.ldm_setup import check_image_size
  concat = ConcatSpec.from_config(config.cond)
  if concat.kind == "none":
    if image is not None or mask is not None:
      raise ValueError("this model takes no image (cond.concat='none'): drop --image / "
                           "--mask")
    return {}
  if image is None:
    raise ValueError(f"this model is conditioned on an image (cond.concat="
                     f"{concat.kind!r}): pass --image=PATH"
                     + (" and --mask=PATH" if concat.kind == "inpaint" else ""))
  pixels = read_image(image, "RGB") * 2.0 - 1.0
  if pixels.shape[0] != pixels.shape[1]:
    raise ValueError(f"--image is {pixels.shape[1]}x{pixels.shape[0]}; the sampler makes "
                     "square images: crop it square first")
  repeat = lambda a: np.repeat(a[None], num, axis=0)
  if concat.kind == "low_res":
    if mask is not None:
      raise ValueError("--mask is for inpainting models; this one does super-resolution")
    check_image_size(config, spec, pixels.shape[0] * concat.low_res_factor,
                     f"--image's size x cond.low_res_factor {concat.low_res_factor}")
    return {"low_res": repeat(pixels)}
  check_image_size(config, spec, pixels.shape[0], "--image's size")
  if mask is None:
    raise ValueError("this model inpaints: pass --mask=PATH (white = repaint)")
  region = (read_image(mask, "L") > 0.5).astype(np.float32)[..., None]
  if region.shape[:2] != pixels.shape[:2]:
    raise ValueError(f"--mask is {region.shape[1]}x{region.shape[0]} but --image is "
                     f"{pixels.shape[1]}x{pixels.shape[0]}")
  return {"image": repeat(pixels), "inpaint_mask": repeat(region)}
