"""4x super-resolution LDM on VQ-f4 latents (latent-diffusion bsr_sr).

Published: 256x256 images from 64x64 inputs; the low-res image itself (in [-1, 1]) is
concatenated to the 64x64x3 VQ-f4 latent, so the UNet takes 6 channels and predicts 3;
model_channels 160, channel_mult (1, 2, 2, 4), attention at downsample factors 16 and 8
with 32 channels per head, 2 res blocks; betas 0.0015..0.0155, l2 loss, base learning
rate 1e-6. The published model degrades its inputs with BSR-GAN's pipeline; ldm_jax
downsamples with antialiased bicubic (ldm_jax.train.concat), our choice.
Variants: `:demo` (tiny UNet on the built-in photos, 64 px from 16 px, first stage
workdir/vq_f4_demo), `:tiny` (tests).
"""

from ldm_jax.config_lib import ldm_config


def get_config(arg=None):
  config = ldm_config(
      first_stage=dict(kind="vq", downsample_factor=4, scale_factor=1.0),
      unet=dict(in_channels=6, out_channels=3, model_channels=160,
                attention_resolutions=(16, 8), num_res_blocks=2, channel_mult=(1, 2, 2, 4),
                num_head_channels=32),
      diffusion=dict(linear_start=0.0015, linear_end=0.0155),
      cond=dict(kind="none", concat="low_res", low_res_factor=4),
      batch_size=64, base_learning_rate=1e-6, image_size=256, arg=arg)
  config.sample.update(steps=100, eta=1.0)
  return config
