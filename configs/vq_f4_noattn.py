"""vq-f4 without attention (attn_type none) first-stage autoencoder, as published by latent-diffusion.

Published reconstruction on ImageNet val: rFID 1.06, PSNR 25.21, 658k steps.
Variants: `--config=configs/vq_f4_noattn.py:demo` (CPU, minutes), `:tiny` (tests).
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
      attn_type='none',
      loss=dict(disc_start=11, disc_weight=0.75, codebook_weight=1.0),
      arg=arg)
