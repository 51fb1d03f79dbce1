"""Class-conditional ImageNet LDM on VQ-f4 latents (latent-diffusion cin256-v2).

Published: 64x64x3 latents, model_channels 192, a SpatialTransformer at downsample factors
8, 4 and 2 with one head and a 512-wide class embedding as context; 1001 classes, the last
being the null class for classifier-free guidance (sampled with scale 3 in 20 DDIM steps).
Variants: `:demo` (tiny UNet on the built-in photos, first stage workdir/vq_f4_demo), `:tiny`.
"""

from ldm_jax.config_lib import ldm_config


def get_config(arg=None):
  config = ldm_config(
      first_stage=dict(kind="vq", downsample_factor=4, scale_factor=1.0),
      unet=dict(in_channels=3, out_channels=3, model_channels=192,
                attention_resolutions=(8, 4, 2), num_res_blocks=2, channel_mult=(1, 2, 3, 5),
                num_heads=1, use_spatial_transformer=True, transformer_depth=1,
                context_dim=512),
      diffusion=dict(linear_start=0.0015, linear_end=0.0195),
      cond=dict(kind="class", num_classes=1001, embed_dim=512),
      batch_size=64, base_learning_rate=1e-4, image_size=256, arg=arg)
  config.sample.update(steps=20, guidance_scale=3.0)
  if arg in ("demo", "tiny"):
    config.cond.num_classes = 16  # the 15 built-in photos as classes, plus the null class
  return config
