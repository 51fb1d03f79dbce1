"""kl-f32 first-stage autoencoder, as published by latent-diffusion.

Published reconstruction on ImageNet val: rFID 2.04, PSNR 22.27, 407k steps.
Variants: `--config=configs/kl_f32.py:demo` (CPU, minutes), `:tiny` (tests).
"""

from ldm_jax.config_lib import autoencoder_config


def get_config(arg=None):
  return autoencoder_config(
      kind='kl',
      embed_dim=64,
      z_channels=64,
      ch_mult=(1, 1, 2, 2, 4, 4),
      attn_resolutions=(16, 8),
      batch_size=6,
      loss=dict(disc_start=50001, kl_weight=1e-06, disc_weight=0.5),
      arg=arg)
