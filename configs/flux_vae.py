"""Fine-tune FLUX.1's VAE (autoencoder) from its published weights.

Published (black-forest-labs/FLUX.1-dev, vae/config.json; the flux repo's `ae_params`
agree: ch 128, ch_mult 1,2,4,4, num_res_blocks 2, z_channels 16): kl-f8 blocks with 16
latent channels and no quant convs; sample_size 1024; latents for the diffusion model are
`(z - 0.1159) * 0.3611` (shift_factor, scaling_factor); force_upcast true. Its training
recipe is not published.

A first-stage config has no key for the latent scale and shift: `LATENT` below records
them, and the export takes them from the `train.init_from` folder's config.json. Start from
the diffusers vae/ folder: BFL's bare ae.safetensors loads too, but carries neither.

Variants: default / `:decoder` fine-tunes the decoder only (FLUX.1's transformer keeps its
latent space), `:full` encoder and decoder; `:demo` (CPU, minutes) and `:tiny` (tests)
train the same topology (16 channels, no quant convs) from random init at reduced width.
Not published, chosen here: learning rate 1e-5, EMA 0.9999, 100k steps, a fresh
discriminator joining after 50k steps, global batch 192 as 8 micro-batches of 24.

Set the weights: --config.train.init_from=PATH (the downloaded vae/ folder; the repository
is gated, accept its licence first) and the LPIPS weights: --config.loss.lpips_weights=PATH.
"""

from ldm_jax.config_lib import vae_finetune_config

LATENT = dict(scaling_factor=0.3611, shift_factor=0.1159, force_upcast=True)


def get_config(arg=None):
  return vae_finetune_config(
      finetunes="black-forest-labs/FLUX.1-dev (its vae/ folder)", z_channels=16,
      quant_convs=False, resolution=1024, batch_size=24, accumulate=8, arg=arg)
