"""Concat conditioning: image-shaped inputs stacked onto the UNet's noisy latent.

`cond.concat` picks what is concatenated on the channel axis (the reference's
conditioning_key "concat"; with a class or text `cond.kind` as well it is "hybrid"):

- "low_res" (super-resolution, latent-diffusion's bsr_sr model): the image downsampled by
  `cond.low_res_factor` (antialiased bicubic), in [-1, 1], resized to the latent's size
  when the two differ. 3 channels. The model learns p(image | low-res image).
- "inpaint" (Stable Diffusion's inpainting models): the mask at the latent's size (1 =
  repaint, nearest resize) then the scaled latent of the masked image, `image * (1 -
  mask)` with masked pixels 0, encoded to its posterior mean. 1 + latent channels: a
  kl-f8 model's UNet takes 4 + 1 + 4 = 9, the layout diffusers' inpainting pipeline feeds.
  Training draws one random rectangle per image, or the whole image with probability
  `cond.full_mask_prob` (0.25 in Stable Diffusion's recipe).

Inputs ("fields") are what a batch or a user supplies: "low_res" [B, h, w, 3] or "image"
[B, H, W, 3] with "inpaint_mask" [B, H, W, 1]. Classifier-free guidance never drops them:
the unconditional side of guidance sees the same concat input (as in the references).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ldm_jax.train import first_stage

KINDS = ("none", "low_res", "inpaint")


@dataclasses.dataclass(frozen=True)
class ConcatSpec:
  kind: str = "none"
  low_res_factor: int = 4
  full_mask_prob: float = 0.25

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"cond.concat={self.kind!r} is not supported; choose one of {KINDS}")
    if self.low_res_factor < 1:
      raise ValueError(f"cond.low_res_factor={self.low_res_factor} must be >= 1")
    if not 0.0 <= self.full_mask_prob <= 1.0:
      raise ValueError(f"cond.full_mask_prob={self.full_mask_prob} must be in [0, 1]")

  @classmethod
  def from_config(cls, cond) -> "ConcatSpec":
    return cls(str(cond.get("concat", "none")), int(cond.get("low_res_factor", 4)),
               float(cond.get("full_mask_prob", 0.25)))

  def channels(self, latent_channels: int) -> int:
    return {"none": 0, "low_res": 3, "inpaint": 1 + latent_channels}[self.kind]

  def image_size(self, fields: dict, default: int) -> int:
    """The side of the images a sampler makes for these inputs."""
    if self.kind == "low_res":
      return int(fields["low_res"].shape[1]) * self.low_res_factor
    if self.kind == "inpaint":
      return int(fields["image"].shape[1])
    return default


def downsample(images: jax.Array, factor: int) -> jax.Array:
  """Antialiased bicubic downsampling by an integer factor, NHWC."""
  b, h, w, c = images.shape
  if h % factor or w % factor:
    raise ValueError(f"images of {h}x{w} do not divide by cond.low_res_factor={factor}")
  return jax.image.resize(images.astype(jnp.float32), (b, h // factor, w // factor, c),
                          method="cubic", antialias=True)


def random_masks(key: jax.Array, batch: int, size: int, full_prob: float) -> jax.Array:
  """[B, size, size, 1] float32 masks: one rectangle each (sides 10% to 90% of the image,
  anywhere inside it), or the whole image with probability `full_prob`."""
  side_key, pos_key, full_key = jax.random.split(key, 3)
  sides = jnp.round(jax.random.uniform(side_key, (batch, 2), minval=0.1, maxval=0.9) * size)
  sides = jnp.clip(sides, 1, size)
  starts = jnp.floor(jax.random.uniform(pos_key, (batch, 2)) * (size - sides + 1))
  coords = jnp.arange(size, dtype=jnp.float32)
  inside = lambda axis: ((coords[None] >= starts[:, axis, None])
                         & (coords[None] < starts[:, axis, None] + sides[:, axis, None]))
  box = inside(0)[:, :, None] & inside(1)[:, None, :]
  full = jax.random.uniform(full_key, (batch,)) < full_prob
  return (box | full[:, None, None]).astype(jnp.float32)[..., None]


def training_fields(spec: ConcatSpec, batch: dict, key: jax.Array) -> dict:
  """The concat inputs of a training batch: given (a latent cache's "low_res") or made
  from its images."""
  if spec.kind == "low_res":
    if "low_res" in batch:
      return {"low_res": batch["low_res"]}
    return {"low_res": downsample(batch["image"], spec.low_res_factor)}
  if spec.kind == "inpaint":
    image = batch["image"]
    return {"image": image,
            "inpaint_mask": random_masks(key, image.shape[0], image.shape[1],
                                         spec.full_mask_prob)}
  return {}


def masked_image(fields: dict) -> jax.Array:
  return fields["image"] * (1.0 - fields["inpaint_mask"])


def concat_input(spec: ConcatSpec, fields: dict, latent_shape: tuple, encode_mean,
                 latent_norm) -> jax.Array | None:
  """[B, h, w, C] to concatenate to latents of `latent_shape`, or None.

  `encode_mean(images)` is the first stage's unscaled latent mean (inpainting only),
  normalized as the diffusion latents are (`latent_norm`: (scale, shift)).
  """
  if spec.kind == "none":
    return None
  b, h, w = latent_shape[:3]
  if spec.kind == "low_res":
    low = fields["low_res"].astype(jnp.float32)
    if low.shape[1:3] != (h, w):
      low = jax.image.resize(low, (b, h, w, low.shape[-1]), method="cubic")
    return low
  mask = fields["inpaint_mask"].astype(jnp.float32)
  small = jax.image.resize(mask, (b, h, w, 1), method="nearest")
  latent = first_stage.normalize(encode_mean(masked_image(fields)).astype(jnp.float32),
                                 latent_norm)
  return jnp.concatenate([small, latent], axis=-1)


def preview(spec: ConcatSpec, fields: dict, size: int) -> jax.Array | None:
  """What the model was given, as images of `size` in [-1, 1] (for sample grids)."""
  if spec.kind == "low_res":
    low = fields["low_res"]
    return jax.image.resize(low, (low.shape[0], size, size, low.shape[-1]), method="nearest")
  if spec.kind == "inpaint":
    return masked_image(fields)
  return None
