"""kl-f4 first-stage autoencoder, as published by latent-diffusion.

Published reconstruction on ImageNet val: rFID 0.27, PSNR 27.53, 177k steps.
Variants: `--config=configs/kl_f4.py:demo` (CPU, minutes), `:tiny` (tests).
"""

from ldm_jax.config_lib import autoencoder_config


def get_config(arg=None):
  return autoencoder_config(
      kind='kl',
      embed_dim=3,
      z_channels=3,
      ch_mult=(1, 2, 4),
      batch_size=10,
      loss=dict(disc_start=50001, kl_weight=1e-06, disc_weight=0.5),
      arg=arg)
