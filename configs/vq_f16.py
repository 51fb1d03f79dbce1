"""vq-f16 (Z=16384) first-stage autoencoder, as published by latent-diffusion.

Published reconstruction on ImageNet val: rFID 5.15, PSNR 20.83, 1.1M steps.
Variants: `--config=configs/vq_f16.py:demo` (CPU, minutes), `:tiny` (tests).
"""

from ldm_jax.config_lib import autoencoder_config


def get_config(arg=None):
  return autoencoder_config(
      kind='vq',
      embed_dim=8,
      z_channels=8,
      ch_mult=(1, 1, 2, 2, 4),
      attn_resolutions=(16,),
      n_embed=16384,
      batch_size=14,
      loss=dict(disc_num_layers=2, disc_start=250001, disc_weight=0.75, codebook_weight=1.0),
      arg=arg)
