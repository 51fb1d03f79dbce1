"""Fine-tune Stable Diffusion 3's VAE from its published weights.

Published (stabilityai/stable-diffusion-3-medium-diffusers, vae/config.json): kl-f8 blocks
(block_out_channels 128,256,512,512, layers_per_block 2, mid attention) with 16 latent
channels and no quant convs (use_quant_conv / use_post_quant_conv false); sample_size 1024;
latents for the diffusion model are `(z - 0.0609) * 1.5305` (shift_factor, scaling_factor);
force_upcast true. Its training recipe is not published.

A first-stage config has no key for the latent scale and shift: `LATENT` below records
them, and the export takes them from the `train.init_from` folder's config.json, so start
from the diffusers vae/ folder (or the pipeline folder) rather than a bare file.

Variants: default / `:decoder` fine-tunes the decoder only (SD3's MMDiT keeps its latent
space), `:full` encoder and decoder; `:demo` (CPU, minutes) and `:tiny` (tests) train the
same topology (16 channels, no quant convs) from random init at reduced width.
Not published, chosen here: learning rate 1e-5, EMA 0.9999, 100k steps, a fresh
discriminator joining after 50k steps, global batch 192 as 8 micro-batches of 24 (the
sd-vae-ft recipe's).

Set the weights: --config.train.init_from=PATH (the downloaded vae/ folder) and the LPIPS
weights: --config.loss.lpips_weights=PATH.
"""

from ldm_jax.config_lib import vae_finetune_config

LATENT = dict(scaling_factor=1.5305, shift_factor=0.0609, force_upcast=True)


def get_config(arg=None):
  return vae_finetune_config(
      finetunes="stabilityai/stable-diffusion-3-medium-diffusers (its vae/ folder)",
      z_channels=16, quant_convs=False, resolution=1024, batch_size=24, accumulate=8, arg=arg)
