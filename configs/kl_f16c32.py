"""kl-f16 with 32 latent channels, trained from scratch: the f16d32 shape of VA-VAE.

VA-VAE (Yao et al. 2025, hustvl/LightningDiT, tokenizer/configs/vavae_f16d32.yaml) is a
latent-diffusion AutoencoderKL with embed_dim 32, z_channels 32, resolution 256, ch 128,
ch_mult 1,1,2,2,4, num_res_blocks 2, attn_resolutions 16 (quant convs kept), kl_weight
1e-6, disc_weight 0.5; ImageNet 256 rFID 0.28. Not reproduced here: its vision-foundation
(DINOv2-aligned) loss, which is what makes its latents easy to diffuse; this is the same
network with the plain L1 + LPIPS + PatchGAN loss. VA-VAE's yaml lists base_learning_rate
1e-4 without saying how it was scaled, so latent-diffusion's kl-f16 rate and batch are kept.
Variants: `--config=configs/kl_f16c32.py:demo` (CPU, minutes), `:tiny` (tests).
"""

from ldm_jax.config_lib import autoencoder_config


def get_config(arg=None):
  return autoencoder_config(
      kind="kl", embed_dim=32, z_channels=32, ch_mult=(1, 1, 2, 2, 4), attn_resolutions=(16,),
      batch_size=6, loss=dict(disc_start=50001, kl_weight=1e-06, disc_weight=0.5), arg=arg)
