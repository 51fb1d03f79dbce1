"""Builds first-stage configs; each file in configs/ states its published numbers here.

A config has four blocks: `model` (the architecture, see AutoencoderSpec), `loss`, `optim`
and `data`/`train` for the run. `get_config(arg)` in a config file picks a variant:
None for the published model, "demo" for a few minutes on a CPU, "tiny" for tests.
"""

from __future__ import annotations

from typing import Any

import ml_collections

VARIANTS = (None, "", "demo", "tiny")


def autoencoder_config(*, kind: str, embed_dim: int, z_channels: int, ch_mult: tuple[int, ...],
                       attn_resolutions: tuple[int, ...] = (), n_embed: int = 0,
                       batch_size: int, loss: dict[str, Any], attn_type: str = "vanilla",
                       arg: str | None = None) -> ml_collections.ConfigDict:
  """A first-stage config with the latent-diffusion defaults, then the model's own numbers."""
  if arg not in VARIANTS:
    raise ValueError(f"unknown config variant {arg!r}; choose one of: demo, tiny (or none)")
  config = ml_collections.ConfigDict()
  config.model = dict(
      kind=kind, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=tuple(ch_mult),
      num_res_blocks=2, attn_resolutions=tuple(attn_resolutions), attn_type=attn_type,
      dropout=0.0, z_channels=z_channels, embed_dim=embed_dim, n_embed=n_embed, beta=0.25,
      legacy=True, remap=None, unknown_index="random", dtype="float32", remat=False)
  config.loss = dict(
      disc_start=50001, disc_weight=0.5, disc_factor=1.0, disc_num_layers=3, disc_ndf=64,
      disc_in_channels=3, disc_loss="hinge", use_actnorm=False, kl_weight=1e-6,
      codebook_weight=1.0, perceptual_weight=1.0, logvar_init=0.0, pixel_loss="l1",
      lpips_weights="", lpips_random_init=False)
  config.loss.update(loss)
  config.optim = dict(base_learning_rate=4.5e-6, scale_lr=True, accumulate_grad_batches=2,
                      b1=0.5, b2=0.9, grad_clip_norm=0.0, ema_decay=0.0)
  config.data = dict(source="builtin", path="", split="train", val_split="validation",
                     image_size=256, batch_size=batch_size, random_crop=True, random_flip=True,
                     num_workers=0, read_threads=8, seed=0, val_fraction=0.05, data_dir="",
                     image_key="image")
  config.train = dict(num_steps=1_000_000, log_every=100, eval_every=5000, ckpt_every=5000,
                      keep_checkpoints=3, seed=0, decoder_only=False, init_from="",
                      mesh=dict(data=-1, fsdp=1), export_format="diffusers")
  if arg == "demo":
    _shrink(config, ch=32, image_size=64, batch_size=8)
    config.loss.perceptual_weight = 0.0  # LPIPS needs VGG weights that cannot ship offline
    # The discriminator joins for the last third at a low weight: a fresh PatchGAN at the
    # full 0.5 costs about 1 dB of PSNR in this short a run.
    config.loss.update(disc_start=200, disc_weight=0.1)
    config.optim.update(base_learning_rate=2e-4, scale_lr=False, accumulate_grad_batches=1,
                        ema_decay=0.98)
    config.train.update(num_steps=300, log_every=50, eval_every=100, ckpt_every=100)
  elif arg == "tiny":
    _shrink(config, ch=32, image_size=32, batch_size=2)
    config.model.ch_mult = tuple(ch_mult[:2])
    config.model.attn_resolutions = (16,) if attn_resolutions else ()
    config.loss.update(perceptual_weight=0.0, disc_start=2, disc_ndf=8, disc_num_layers=2)
    config.optim.update(base_learning_rate=1e-3, scale_lr=False, accumulate_grad_batches=1)
    config.train.update(num_steps=4, log_every=1, eval_every=2, ckpt_every=2)
  return config


def _shrink(config: ml_collections.ConfigDict, *, ch: int, image_size: int,
            batch_size: int) -> None:
  """Same topology at a lower width and resolution; attention stays at the same levels."""
  scale = config.model.resolution // image_size
  config.model.ch = ch
  config.model.attn_resolutions = tuple(r // scale for r in config.model.attn_resolutions)
  config.model.resolution = image_size
  config.data.image_size = image_size
  config.data.batch_size = batch_size
  if config.model.n_embed:
    config.model.n_embed = min(config.model.n_embed, 256)
