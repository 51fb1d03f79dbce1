"""Fine-tune Stable Diffusion's VAE decoder as sd-vae-ft-ema / sd-vae-ft-mse were.

Published recipe (Stability AI): start from kl-f8 (SD's VAE), train the decoder only so the
latent space does not move, keep an EMA of the weights, global batch 192.
- `:mse` (default): sd-vae-ft-mse, 280k steps of MSE + 0.1 * LPIPS.
- `:ema`: sd-vae-ft-ema, 313k steps of the original loss, L1 + LPIPS.
Not published, chosen here: learning rate 1e-5 without batch scaling, EMA decay 0.9999,
and a fresh discriminator that joins after 50k steps (the kl-f8 disc_start).

Set the starting weights: --config.train.init_from=PATH (a diffusers VAE folder or a
CompVis checkpoint) and the LPIPS weights: --config.loss.lpips_weights=PATH.
"""

from ldm_jax.config_lib import autoencoder_config


def get_config(arg=None):
  recipe = arg or "mse"
  if recipe not in ("mse", "ema"):
    raise ValueError(f"unknown variant {arg!r}; choose mse or ema")
  config = autoencoder_config(
      kind="kl", embed_dim=4, z_channels=4, ch_mult=(1, 2, 4, 4), batch_size=24,
      loss=dict(disc_start=50001, kl_weight=1e-6, disc_weight=0.5,
                pixel_loss="mse" if recipe == "mse" else "l1",
                perceptual_weight=0.1 if recipe == "mse" else 1.0))
  # The published global batch of 192 as 8 micro-batches of 24: 3 images per device on
  # 8 devices, scanned on GPU / TPU (one micro-batch's activations at a time). By the
  # compile-time figures (bench/README.md) 6 per device needs 0.97 + 15.5 GiB, over 16
  # with the runtime's own share; 24 per device would need 60.
  config.optim.update(base_learning_rate=1e-5, scale_lr=False, accumulate_grad_batches=8,
                      ema_decay=0.9999)
  config.train.update(decoder_only=True, num_steps=280_000 if recipe == "mse" else 313_000)
  return config
