"""What a first-stage run is, from its config alone: checks, spec, programs, state shapes.

Kept apart from the trainer so that export, benchmarks and tests build the same step
without touching data, checkpoints or logging.
"""

from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from ldm_jax.data.spec import DataSpec
from ldm_jax.eval.setup import DEFAULTS as EVAL_DEFAULTS, eval_config
from ldm_jax.losses.autoencoder import LossConfig, check_eq_vae_sizes
from ldm_jax.models.autoencoder import AutoencoderSpec, abstract_autoencoder
from ldm_jax.train import autoencoder_step as step_lib
from ldm_jax.train import loop
from ldm_jax.train.optim import adam, learning_rate

KNOWN_KEYS = {
    "optim": {"base_learning_rate", "scale_lr", "accumulate_grad_batches", "b1", "b2",
              "grad_clip_norm", "ema_decay"},
    "train": loop.TRAIN_KEYS | {"decoder_only", "init_from", "init_discriminator", "finetunes",
                                "export_format"},
    "eval": set(EVAL_DEFAULTS),  # optional: runs saved before it existed lack the block
}


INIT_DISCRIMINATOR = ("auto", "fresh")  # train.init_discriminator


def check_config(config: ml_collections.ConfigDict) -> tuple[AutoencoderSpec, LossConfig]:
  """Fails with a clear message on unknown keys or inconsistent values."""
  for block, known in KNOWN_KEYS.items():
    unknown = sorted(set((config.get(block) or {}).keys()) - known)
    if unknown:
      raise ValueError(f"unknown config keys {block}.{unknown}; valid: {sorted(known)}")
  eval_config(config)  # its values
  spec = AutoencoderSpec.from_config(config.model)
  loss = LossConfig.from_config(config.loss)
  data = DataSpec.from_config(config.data)  # its keys and values (batch_size >= 1, ...)
  factor = spec.downsample_factor
  if data.image_size % factor:
    lower = data.image_size // factor * factor
    raise ValueError(f"data.image_size={data.image_size} is not divisible by the model's "
                     f"downsampling factor {factor}, so the latent grid would not cover "
                     f"the image: use a multiple of {factor} (e.g. "
                     f"{lower or factor} or {lower + factor})")
  # EQ-VAE's downscaled latents and images need whole sizes the losses can take.
  check_eq_vae_sizes(loss, data.image_size, spec.downsample_factor)
  loop.LoopSpec.from_config(config.train)
  if config.optim.accumulate_grad_batches < 1:
    raise ValueError("optim.accumulate_grad_batches must be >= 1")
  if config.train.decoder_only and not config.train.init_from:
    raise ValueError("train.decoder_only fine-tunes a trained decoder: set "
                     "train.init_from to the autoencoder weights to start from")
  mode = config.train.get("init_discriminator", "auto")  # absent in configs saved before it
  if mode not in INIT_DISCRIMINATOR:
    raise ValueError(f"train.init_discriminator={mode!r}; choose 'auto' (load the "
                     "discriminator of a train.init_from training checkpoint when it holds "
                     "one) or 'fresh' (start a new one from train.seed)")
  if config.train.get("finetunes") and not config.train.init_from:
    raise ValueError(f"this config fine-tunes {config.train.finetunes}: download those "
                     "weights and set --config.train.init_from=PATH (the diffusers vae "
                     "folder, or a CompVis checkpoint)")
  return spec, loss


def build_programs(config: ml_collections.ConfigDict, lpips_def=None):
  """The model spec and the step's static programs (no weights, no data)."""
  spec, loss = check_config(config)
  lr = learning_rate(config.optim, DataSpec.from_config(config.data).batch_size)
  programs = step_lib.make_programs(
      spec, loss, adam(config.optim, lr), adam(config.optim, lr),
      float(config.optim.ema_decay), bool(config.train.decoder_only), lpips_def)
  return spec, programs


def abstract_state(config, spec, programs) -> step_lib.TrainState:
  """The train state's shapes and dtypes, without computing anything."""
  loss = programs.loss
  graphdef, model_state = nnx.split(abstract_autoencoder(spec))
  return jax.eval_shape(lambda s: step_lib.new_state(
      nnx.merge(graphdef, s), step_lib.build_discriminator(loss, spec.dtype, 0), programs,
      bool(config.train.decoder_only), 0), model_state)


