"""Stable Diffusion 1.x / 2.x in ldm_jax: a loaded pipeline and what samples from it.

A `Pipeline` is what a diffusers pipeline folder or an SD single-file checkpoint holds,
as ldm_jax modules: the UNet, the VAE with its latent scale (and shift), the CLIP /
OpenCLIP text encoder, its tokenizer, and the noise schedule with its prediction type.
`ldm_jax.convert.pipeline` reads and writes them; the functions below sample.
"""

from __future__ import annotations

import dataclasses
from typing import Any


from ldm_jax.diffusion.schedules import Schedule, beta_schedule

# diffusers' beta_schedule names -> ldm_jax's (schedules.beta_schedule): SD's
# "scaled_linear" is linear in sqrt(beta), which CompVis calls "linear".
BETA_SCHEDULES = {"scaled_linear": "linear", "linear": "sqrt_linear"}
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
  """The fields of a diffusers `scheduler_config.json` that change the numbers (SD1 / SD2
  defaults); `extra` keeps the rest so a saved pipeline writes them back."""

  num_train_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  beta_schedule: str = "scaled_linear"
  prediction_type: str = "epsilon"
  timestep_spacing: str = "leading"
  steps_offset: int = 1
  set_alpha_to_one: bool = False
  clip_sample: bool = False
  extra: tuple[tuple[str, Any], ...] = ()

  def __post_init__(self):
    if self.beta_schedule not in BETA_SCHEDULES:
      raise ValueError(f"scheduler beta_schedule={self.beta_schedule!r} is not supported; "
                       f"choose one of {sorted(BETA_SCHEDULES)}")
    if self.prediction_type not in PREDICTION_TYPES:
      raise ValueError(f"scheduler prediction_type={self.prediction_type!r} is not "
                       f"supported; choose one of {sorted(PREDICTION_TYPES)}")

  @property
  def schedule(self) -> Schedule:
    return Schedule(beta_schedule(BETA_SCHEDULES[self.beta_schedule], self.num_train_timesteps,
                                  self.beta_start, self.beta_end))

  @property
  def parameterization(self) -> str:
    """ldm_jax's name for the prediction type: "eps", "v" or "x0"."""
    return PREDICTION_TYPES[self.prediction_type]


@dataclasses.dataclass
class Pipeline:
  """A Stable Diffusion checkpoint as ldm_jax modules (see the module docstring).

  `variant` says what was read: "sd1" (CLIP ViT-L/14 text, last layer), "sd2" (OpenCLIP
  ViT-H/14 text, penultimate layer), with "-inpaint" when the UNet takes 9 channels.
  Latents are `(z - latent_shift) * latent_scale`, as `first_stage.normalize`.
  """

  unet: Any  # models.unet.UNetModel
  vae: Any  # models.autoencoder.AutoencoderKL
  text_encoder: Any  # models.clip.CLIPTextTransformer
  tokenizer: Any  # data.tokenizer.CLIPTokenizer
  scheduler: SchedulerConfig
  latent_scale: float = 0.18215
  latent_shift: float = 0.0
  variant: str = "sd1"
  sample_size: int = 64  # the UNet's trained latent size (64 for 512 px, 96 for 768 px)

  @property
  def latent_norm(self) -> tuple[float, float]:
    """(scale, shift) as `train.first_stage.normalize` takes them."""
    return (self.latent_scale, self.latent_shift)
