"""kl-f8 with 16 latent channels, trained from scratch: the SD3 / FLUX.1 VAE topology.

The architecture of stabilityai/stable-diffusion-3-medium-diffusers' and
black-forest-labs/FLUX.1-dev's VAEs (vae/config.json: block_out_channels 128,256,512,512,
layers_per_block 2, mid attention, 16 latent channels, no quant convs), so the export
loads wherever those do. Their training recipe is not published: the loss, learning rate
and batch are latent-diffusion's kl-f8 ones. The latent scale (and shift) for a diffusion
model are this run's to measure (an LDM config's first_stage.scale_by_std does).
Variants: `--config=configs/kl_f8c16.py:demo` (CPU, minutes), `:tiny` (tests).
"""

from ldm_jax.config_lib import autoencoder_config


def get_config(arg=None):
  config = autoencoder_config(
      kind="kl", embed_dim=16, z_channels=16, ch_mult=(1, 2, 4, 4), batch_size=4,
      loss=dict(disc_start=50001, kl_weight=1e-06, disc_weight=0.5), arg=arg)
  # The encoder's 2*16 outputs are the posterior's moments as they are.
  config.model.update(use_quant_conv=False, use_post_quant_conv=False)
  return config
