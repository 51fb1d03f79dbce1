"""vq-f8 (Z=16384) first-stage autoencoder, as published by latent-diffusion.

Published reconstruction on ImageNet val: rFID 1.14, PSNR 23.07, 971k steps.
Variants: `--config=configs/vq_f8.py:demo` (CPU, minutes), `:tiny` (tests).
"""

from ldm_jax.config_lib import autoencoder_config


def get_config(arg=None):
  return autoencoder_config(
      kind='vq',
      embed_dim=4,
      z_channels=4,
      ch_mult=(1, 2, 2, 4),
      attn_resolutions=(32,),
      n_embed=16384,
      batch_size=10,
      loss=dict(disc_num_layers=2, disc_start=1, disc_weight=0.6, codebook_weight=1.0),
      arg=arg)
