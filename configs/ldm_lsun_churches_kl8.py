"""Unconditional LSUN-Churches LDM on KL-f8 latents (latent-diffusion lsun_churches-ldm-kl-8).

Published: 32x32x4 latents rescaled by scale_by_std, model_channels 192, channel_mult
(1, 2, 2, 4, 4), legacy attention with 8 heads at downsample factors 1, 2, 4, 8,
scale-shift norm, resampling inside ResBlocks, L1 loss, betas 0.0015..0.0155, batch 96,
base learning rate 5e-5 with a 10k-step linear warm-up.
"""

from ldm_jax.config_lib import ldm_config


def get_config(arg=None):
  return ldm_config(
      first_stage=dict(kind="kl", downsample_factor=8, scale_by_std=True),
      unet=dict(in_channels=4, out_channels=4, model_channels=192,
                attention_resolutions=(1, 2, 4, 8), num_res_blocks=2,
                channel_mult=(1, 2, 2, 4, 4), num_heads=8, use_scale_shift_norm=True,
                resblock_updown=True),
      diffusion=dict(linear_start=0.0015, linear_end=0.0155, loss_type="l1"),
      cond=dict(kind="none"),
      batch_size=96, base_learning_rate=5e-5, warmup_steps=10_000, image_size=256, arg=arg)
