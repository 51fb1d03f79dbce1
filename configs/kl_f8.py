"""kl-f8 (Stable Diffusion's VAE topology) first-stage autoencoder, as published by latent-diffusion.

Published reconstruction on ImageNet val: rFID 0.90, PSNR 24.19, 247k steps.
Variants: `--config=configs/kl_f8.py:demo` (CPU, minutes), `:tiny` (tests).
"""

from ldm_jax.config_lib import autoencoder_config


def get_config(arg=None):
  return autoencoder_config(
      kind='kl',
      embed_dim=4,
      z_channels=4,
      ch_mult=(1, 2, 4, 4),
      batch_size=4,
      loss=dict(disc_start=50001, kl_weight=1e-06, disc_weight=0.5),
      arg=arg)
