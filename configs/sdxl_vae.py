"""Fine-tune SDXL's VAE (stabilityai/sdxl-vae) from its published weights.

Published (stabilityai/sdxl-vae, model card and vae config.json): the kl-f8 architecture of
SD's VAE (4 latent channels, quant convs, block_out_channels 128,256,512,512), retrained at
batch 256 (SD's: 9) with an EMA of the weights; sample_size 1024; latents for the diffusion
model are `z * 0.13025` (scaling_factor, no shift); force_upcast true (it overflows in
float16, not in bfloat16). COCO 2017 val 256x256: rFID 4.42, PSNR 24.7, SSIM 0.73.

A first-stage config has no key for the latent scale: `LATENT` below records it, and the
export takes it from the `train.init_from` folder's config.json, so start from the diffusers
folder (not a bare .safetensors) to keep it.

Variants: default / `:decoder` fine-tunes the decoder only (SDXL's UNet keeps its latent
space), `:full` encoder and decoder; `:demo` (CPU, minutes) and `:tiny` (tests) train the
same topology from random init at reduced width, without the download.
Not published, chosen here: learning rate 1e-5, EMA 0.9999, 100k steps, a fresh
discriminator joining after 50k steps, and the global batch of 256 as 8 micro-batches of 32.

Set the weights: --config.train.init_from=PATH/sdxl-vae (the downloaded folder) and the
LPIPS weights: --config.loss.lpips_weights=PATH.
"""

from ldm_jax.config_lib import vae_finetune_config

LATENT = dict(scaling_factor=0.13025, shift_factor=None, force_upcast=True)


def get_config(arg=None):
  return vae_finetune_config(finetunes="stabilityai/sdxl-vae", z_channels=4, quant_convs=True,
                             resolution=1024, batch_size=32, accumulate=8, arg=arg)
