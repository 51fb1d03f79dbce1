"""Text-to-image LDM on KL-f8 latents (latent-diffusion txt2img-1p4B).

Published: latents scaled by 0.18215, model_channels 320, channel_mult (1, 2, 4, 4),
SpatialTransformers with 8 heads at downsample factors 4, 2, 1 attending to a 1280-wide
context from a text transformer (32 layers, 8 heads of 64, vocabulary 30522, 77 tokens)
trained jointly; betas 0.00085..0.012; base learning rate 5e-5. Batch 32 is our choice
(the published config names none): 4 images per device on 8 devices, 2.7 + 9.7 GiB with
the state split over each host (bench/README.md, scaling.py). Tokens: bytes by default, or
BERT WordPiece with `--config.cond.vocab_file=vocab.txt` (bert-base-uncased's vocabulary
is what the published model used). Condition dropout 0.1 is our choice, for guidance.
"""

import ml_collections

from ldm_jax.config_lib import ldm_config


def get_config(arg=None):
  config = ldm_config(
      first_stage=dict(kind="kl", downsample_factor=8, scale_factor=0.18215),
      unet=dict(in_channels=4, out_channels=4, model_channels=320,
                attention_resolutions=(4, 2, 1), num_res_blocks=2, channel_mult=(1, 2, 4, 4),
                num_heads=8, use_spatial_transformer=True, transformer_depth=1,
                context_dim=1280, remat=True),
      diffusion=dict(linear_start=0.00085, linear_end=0.012),
      cond=dict(kind="text", text_width=1280, text_depth=32, text_heads=8, text_head_dim=64,
                dropout_prob=0.1),
      batch_size=32, base_learning_rate=5e-5, image_size=256, arg=arg)
  if arg is None:
    # fp32 weights, Adam moments and EMA of the 872M UNet and the 0.5B text transformer
    # are 22 GiB per device replicated: split them over the devices of each host
    # (bench/README.md, "Memory per device"). The demo and tiny variants fit anywhere.
    config.train.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp="host", dcn_data=1))
  return config
