"""Builds first-stage configs; each file in configs/ states its published numbers here.

A config has four blocks: `model` (the architecture, see AutoencoderSpec), `loss`, `optim`
and `data`/`train` for the run. `get_config(arg)` in a config file picks a variant:
None for the published model, "demo" for a few minutes on a CPU, "tiny" for tests.
"""

from __future__ import annotations

import difflib
from typing import Any

import ml_collections

VARIANTS = (None, "", "demo", "tiny")


def check_variant(arg: str | None, choices, default: str = "") -> None:
  """Refuses a variant name a config file does not know (`--config=FILE:dmeo`), with the
  closest name: a typo would otherwise fail far from the flag, or not at all."""
  if arg in choices:
    return
  names = [c for c in choices if c]
  close = difflib.get_close_matches(str(arg), names, n=1)
  hint = f" (did you mean {close[0]!r}?)" if close else ""
  none = f"{default}, the default" if default else "the published model"
  raise ValueError(f"unknown config variant {arg!r}{hint}: choose "
                   f"{', '.join(n for n in names if n != default)}, or no variant ({none})")


def autoencoder_config(*, kind: str, embed_dim: int, z_channels: int, ch_mult: tuple[int, ...],
                       attn_resolutions: tuple[int, ...] = (), n_embed: int = 0,
                       batch_size: int, loss: dict[str, Any], attn_type: str = "vanilla",
                       arg: str | None = None) -> ml_collections.ConfigDict:
  """A first-stage config with the latent-diffusion defaults, then the model's own numbers."""
  check_variant(arg, VARIANTS)
  config = ml_collections.ConfigDict()
  config.model = dict(
      kind=kind, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=tuple(ch_mult),
      num_res_blocks=2, attn_resolutions=tuple(attn_resolutions), attn_type=attn_type,
      dropout=0.0, z_channels=z_channels, embed_dim=embed_dim, n_embed=n_embed, beta=0.25,
      legacy=True, remap=None, unknown_index="random", dtype="float32", remat=False,
      # Later VAEs drop these (SD3 / FLUX.1: no quant convs); see AutoencoderSpec.
      use_quant_conv=True, use_post_quant_conv=True, mid_block_attention=True,
      norm_num_groups=32)
  config.loss = dict(
      disc_start=50001, disc_weight=0.5, disc_factor=1.0, disc_num_layers=3, disc_ndf=64,
      disc_in_channels=3, disc_loss="hinge", use_actnorm=False, kl_weight=1e-6,
      codebook_weight=1.0, perceptual_weight=1.0, logvar_init=0.0, pixel_loss="l1",
      lpips_weights="", lpips_random_init=False, lpips_dropout=False,
      eq_vae_prob=0.0, eq_vae_scales=(0.25, 0.5, 0.75), eq_vae_rotations=True)
  config.loss.update(loss)
  config.optim = dict(base_learning_rate=4.5e-6, scale_lr=True, accumulate_grad_batches=2,
                      b1=0.5, b2=0.9, grad_clip_norm=0.0, ema_decay=0.0)
  config.data = dict(source="builtin", path="", split="train", val_split="validation",
                     image_size=256, batch_size=batch_size, random_crop=True, random_flip=True,
                     num_workers=0, read_threads=8, seed=0, val_fraction=0.05, data_dir="",
                     image_key="image", max_aspect_ratio=4.0, max_image_pixels=89_478_485,
                     short_side=0, random_channel_order=False, download=True,
                     allow_empty_captions=False)  # see ldm_jax/data/spec.py
  config.train = dict(num_steps=1_000_000, log_every=100, eval_every=5000, ckpt_every=5000,
                      keep_checkpoints=3, seed=0, decoder_only=False, init_from="",
                      # With init_from: "auto" also loads a training checkpoint's
                      # discriminator (loss.discriminator.*), "fresh" starts a new one.
                      init_discriminator="auto",
                      # The published weights a fine-tuning recipe starts from (a name for
                      # messages): when set, a run without init_from is refused.
                      finetunes="",
                      mesh=dict(data=-1, fsdp=1, dcn_data=1), export_format="diffusers",
                      eval_examples=64, on_nonfinite="stop", max_nonfinite=100,
                      eval_at_start=True, preemption_every=10,
                      sharding_rules=(), max_unsharded_fraction=0.1)  # see ldm_jax/mesh.py
  config.eval = dict(inception_weights="", reference_stats="", num_examples=0, clip_model="")
  if arg == "demo":
    _shrink(config, ch=32, image_size=64, batch_size=8)
    # Four channels per GroupNorm group, as the published ch=128 with 32 groups: at width
    # 32 the reference's 32 groups normalize every channel alone, and the decoder's last
    # norm then erases each image's mean colour (the demo scored below a flat grey).
    config.model.norm_num_groups = 8
    # Random 64-pixel crops of the 128-pixel built-in tiles: the tiles shrunk to 64 are 54
    # fixed images, memorized in a few hundred steps (see data/spec.py). Shuffling the
    # channels too (data.random_channel_order) reached 0.7 dB less at step 300 and grey
    # reconstructions: in this short a run it slows the learning of colour more than it
    # helps. README "Set up" has the figures.
    config.data.update(short_side=128)
    config.loss.perceptual_weight = 0.0  # LPIPS needs VGG weights that cannot ship offline
    # The squared error (sd-vae-ft-mse's pixel term), which PSNR measures: +0.6 dB over L1
    # at steps 100 and 200 of this demo (README "Set up").
    config.loss.pixel_loss = "mse"
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
    # The GAN from step 0: one step program per run (before disc_start the loop runs a
    # second one without the discriminator). Tests of that switch set disc_start.
    config.loss.update(perceptual_weight=0.0, disc_start=0, disc_ndf=8, disc_num_layers=2)
    config.optim.update(base_learning_rate=1e-3, scale_lr=False, accumulate_grad_batches=1)
    config.train.update(num_steps=4, log_every=1, eval_every=2, ckpt_every=2)
  return config


FINETUNE_VARIANTS = (None, "", "decoder", "full", "demo", "tiny")


def vae_finetune_config(*, finetunes: str, z_channels: int, quant_convs: bool,
                        resolution: int, batch_size: int, accumulate: int,
                        arg: str | None = None) -> ml_collections.ConfigDict:
  """A recipe that fine-tunes a published kl-f8-family VAE (SDXL, SD3, FLUX.1).

  These VAEs are the CompVis kl-f8 Encoder/Decoder (ch 128, ch_mult 1,2,4,4, two blocks,
  mid attention only) with other latent widths and with or without quant convs. Variants:
  None / "decoder": the decoder only, from `train.init_from`; the latent space, which the
  published diffusion models were trained in, stays as it is. "full": encoder and decoder
  (a new latent space: the published diffusion models no longer fit it). "demo" / "tiny":
  from random init at reduced width with the same latent and quant-conv options, so the
  topology can be tried without the download. `finetunes` names the weights for the error
  a run without `train.init_from` gets.
  """
  check_variant(arg, FINETUNE_VARIANTS, default="decoder")
  small = arg in ("demo", "tiny")
  config = autoencoder_config(
      kind="kl", embed_dim=z_channels, z_channels=z_channels, ch_mult=(1, 2, 4, 4),
      batch_size=batch_size, loss=dict(disc_start=50001, kl_weight=1e-6, disc_weight=0.5),
      arg=arg if small else None)
  # Without quant convs embed_dim must equal z_channels (AutoencoderSpec checks it).
  config.model.update(use_quant_conv=quant_convs, use_post_quant_conv=quant_convs)
  if small:
    return config
  # diffusers' sample_size. No level has attention, so it changes no weight; it is
  # written back on export, where diffusers sizes its tiles by it.
  config.model.resolution = resolution
  # As sd_vae_ft_mse: a small constant rate and an EMA of the weights.
  config.optim.update(base_learning_rate=1e-5, scale_lr=False,
                      accumulate_grad_batches=accumulate, ema_decay=0.9999)
  config.train.update(finetunes=finetunes, decoder_only=arg != "full", num_steps=100_000)
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


def ldm_config(*, first_stage: dict[str, Any], unet: dict[str, Any], diffusion: dict[str, Any],
               cond: dict[str, Any], batch_size: int, base_learning_rate: float,
               scale_lr: bool = True, warmup_steps: int = 0, image_size: int = 256,
               arg: str | None = None) -> ml_collections.ConfigDict:
  """An LDM config: the published numbers, with the reference's defaults for the rest.

  `first_stage`: `path` (an ldm_jax autoencoder workdir or PyTorch weights), `kind`,
  `downsample_factor`, `scale_factor` and `scale_by_std`. `unet` uses the CompVis
  openaimodel argument names. `cond.kind` (none | class | text, or clip for a Stable
  Diffusion fine-tune: configs/sd_finetune.py, train.sd_source) is the cross-attention
  condition, `cond.concat` (none | low_res | inpaint) what is concatenated to the latent;
  both together are the reference's "hybrid" (see ldm_jax.train.concat).
  """
  check_variant(arg, VARIANTS)
  config = ml_collections.ConfigDict()
  config.stage = "ldm"
  # Latents are normalized as (z - shift_factor) * scale_factor. latent_scaling="auto"
  # takes both from first_stage.path's config.json when it is a diffusers folder stating
  # them (SD3 / FLUX.1 VAEs), "config" always uses these; scale_by_std estimates the scale
  # from the first batch (and the shift, as the latents' mean, with shift_by_mean).
  config.first_stage = dict(path="", kind="kl", downsample_factor=8, scale_factor=1.0,
                            shift_factor=0.0, latent_scaling="auto", scale_by_std=False,
                            shift_by_mean=False, cache_dir="")
  config.first_stage.update(first_stage)
  config.unet = dict(
      in_channels=4, out_channels=4, model_channels=192, attention_resolutions=(),
      num_res_blocks=2, channel_mult=(1, 2, 4, 4), dropout=0.0, conv_resample=True,
      num_heads=-1, num_head_channels=-1, use_scale_shift_norm=False, resblock_updown=False,
      use_spatial_transformer=False, transformer_depth=1, context_dim=0,
      use_linear_in_transformer=False, num_classes=0, dtype="float32", remat=False)
  config.unet.update(unet)
  config.diffusion = dict(timesteps=1000, beta_schedule="linear", linear_start=0.0015,
                          linear_end=0.0195, cosine_s=8e-3, parameterization="eps",
                          loss_type="l2", learn_logvar=False, logvar_init=0.0,
                          l_simple_weight=1.0, original_elbo_weight=0.0)
  config.diffusion.update(diffusion)
  config.cond = dict(kind="none", num_classes=0, embed_dim=512, dropout_prob=0.0,
                     vocab_file="", max_length=77, text_width=1280, text_depth=32,
                     text_heads=8, text_head_dim=64, caption_key="caption",
                     label_key="label", concat="none", low_res_factor=4,
                     full_mask_prob=0.25)
  config.cond.update(cond)
  config.optim = dict(base_learning_rate=base_learning_rate, scale_lr=scale_lr,
                      accumulate_grad_batches=1, b1=0.9, b2=0.999, eps=1e-8,
                      weight_decay=0.01, warmup_steps=warmup_steps, grad_clip_norm=0.0,
                      ema_decay=0.9999)
  config.data = dict(source="builtin", path="", split="train", val_split="validation",
                     image_size=image_size, batch_size=batch_size, random_crop=True,
                     random_flip=True, num_workers=0, read_threads=8, seed=0,
                     val_fraction=0.05, data_dir="", image_key="image", max_aspect_ratio=4.0,
                     max_image_pixels=89_478_485,  # decoding bounds: see data/sources.py
                     short_side=0, random_channel_order=False,
                     download=True,  # tfds: prepare a dataset not in data_dir
                     allow_empty_captions=False)  # see ldm_jax/data/spec.py
  config.sample = dict(sampler="ddim", steps=50, eta=0.0, guidance_scale=1.0, num=16,
                       every=5000)
  config.train = dict(num_steps=1_000_000, log_every=100, eval_every=5000, ckpt_every=5000,
                      keep_checkpoints=3, seed=0, mesh=dict(data=-1, fsdp=1, dcn_data=1),
                      eval_examples=1000,  # FID / IS samples every eval_every; 0 = all
                      on_nonfinite="stop", max_nonfinite=100,  # see ldm_jax/train/guard.py
                      eval_at_start=True, preemption_every=10,  # see ldm_jax/train/loop.py
                      sharding_rules=(), max_unsharded_fraction=0.1)  # see ldm_jax/mesh.py
  config.eval = dict(inception_weights="", reference_stats="", num_examples=0, clip_model="")
  if arg in ("demo", "tiny"):
    _shrink_ldm(config, tiny=arg == "tiny")
  return config


def _shrink_ldm(config: ml_collections.ConfigDict, *, tiny: bool) -> None:
  """A small UNet on the built-in photos; the first stage is the autoencoder's demo run."""
  factor = config.first_stage.downsample_factor
  ae = {"kl": "kl_f8" if factor == 8 else f"kl_f{factor}", "vq": f"vq_f{factor}"}
  config.first_stage.path = f"workdir/{ae[config.first_stage.kind]}_demo"
  config.first_stage.update(scale_by_std=True, scale_factor=1.0)
  config.unet.update(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(2,), num_heads=-1, num_head_channels=16,
                     transformer_depth=1)
  if config.unet.use_spatial_transformer:
    config.unet.context_dim = 64
  config.cond.update(embed_dim=64, text_width=64, text_depth=2, text_heads=2, text_head_dim=32,
                     max_length=32)
  if config.cond.kind in ("class", "text"):
    config.cond.dropout_prob = 0.1
  config.optim.update(base_learning_rate=2e-4, scale_lr=False, warmup_steps=0, ema_decay=0.99)
  config.data.update(image_size=64, batch_size=8)
  config.sample.update(steps=20, num=8, every=1000)
  config.train.update(num_steps=3000, log_every=100, eval_every=1000, ckpt_every=1000)
  if tiny:
    config.unet.update(num_res_blocks=1, channel_mult=(1, 2))
    config.data.update(image_size=32, batch_size=2)
    config.sample.update(steps=4, num=2, every=2)
    config.train.update(num_steps=4, log_every=1, eval_every=2, ckpt_every=2)
