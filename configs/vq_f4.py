"""vq-f4 (Z=8192) first-stage autoencoder, as published by latent-diffusion.

Published reconstruction on ImageNet val: rFID 0.58, PSNR 27.43, 533k steps.
Variants: `--config=configs/vq_f4.py:demo` (CPU, minutes), `:tiny` (tests).
"""

from ldm_jax.config_lib import autoencoder_config


def get_config(arg=None):
  return autoencoder_config(
      kind='vq',
      embed_dim=3,
      z_channels=3,
      ch_mult=(1, 2, 4),
      n_embed=8192,
      batch_size=8,
      loss=dict(disc_start=0, disc_weight=0.75, codebook_weight=1.0),
      arg=arg)
