"""Unconditional CelebA-HQ 256 LDM on VQ-f4 latents (latent-diffusion celebahq-ldm-vq-4).

Published: model_channels 224, legacy attention blocks of 32 channels per head at
downsample factors 8, 4, 2, channel_mult (1, 2, 3, 4), batch 48, base learning rate 2e-6.
"""

from ldm_jax.config_lib import ldm_config


def get_config(arg=None):
  return ldm_config(
      first_stage=dict(kind="vq", downsample_factor=4, scale_factor=1.0),
      unet=dict(in_channels=3, out_channels=3, model_channels=224,
                attention_resolutions=(8, 4, 2), num_res_blocks=2, channel_mult=(1, 2, 3, 4),
                num_head_channels=32),
      diffusion=dict(linear_start=0.0015, linear_end=0.0195),
      cond=dict(kind="none"),
      batch_size=48, base_learning_rate=2e-6, image_size=256, arg=arg)
