"""vq-f8 (Z=256) first-stage autoencoder, as published by latent-diffusion.

Published reconstruction on ImageNet val: rFID 1.49, PSNR 22.35, 1.6M steps.
Variants: `--config=configs/vq_f8_n256.py:demo` (CPU, minutes), `:tiny` (tests).
"""

from ldm_jax.config_lib import autoencoder_config


def get_config(arg=None):
  return autoencoder_config(
      kind='vq',
      embed_dim=4,
      z_channels=4,
      ch_mult=(1, 2, 2, 4),
      attn_resolutions=(32,),
      n_embed=256,
      batch_size=10,
      loss=dict(disc_start=250001, disc_weight=0.75, codebook_weight=1.0),
      arg=arg)
