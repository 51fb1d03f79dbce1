"""Text-guided inpainting LDM on KL-f8 latents (hybrid conditioning).

The txt2img-1p4B model (see ldm_txt2img.py: model_channels 320, channel_mult (1, 2, 4, 4),
SpatialTransformers at downsample factors 4, 2, 1 over a jointly trained 1280-wide text
transformer, betas 0.00085..0.012, latents scaled by 0.18215) with Stable Diffusion's
inpainting input: the latent-size mask and the masked image's latent concatenated to the
noisy latent, 4 + 1 + 4 = 9 input channels; training masks are random rectangles, or the
whole image a quarter of the time (Stable Diffusion's recipe). Combining the two is our
choice; batch 64 and base learning rate 5e-5 follow ldm_txt2img.py.
Variants: `:demo` (tiny UNet on the built-in photos and their captions, first stage
workdir/kl_f8_demo), `:tiny` (tests).
"""

from ldm_jax.config_lib import ldm_config


def get_config(arg=None):
  return ldm_config(
      first_stage=dict(kind="kl", downsample_factor=8, scale_factor=0.18215),
      unet=dict(in_channels=9, out_channels=4, model_channels=320,
                attention_resolutions=(4, 2, 1), num_res_blocks=2, channel_mult=(1, 2, 4, 4),
                num_heads=8, use_spatial_transformer=True, transformer_depth=1,
                context_dim=1280, remat=True),
      diffusion=dict(linear_start=0.00085, linear_end=0.012),
      cond=dict(kind="text", concat="inpaint", full_mask_prob=0.25, text_width=1280,
                text_depth=32, text_heads=8, text_head_dim=64, dropout_prob=0.1),
      batch_size=64, base_learning_rate=5e-5, image_size=256, arg=arg)
