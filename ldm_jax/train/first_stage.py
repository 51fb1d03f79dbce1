"""The frozen first stage of an LDM: where it comes from, and its latents.

The autoencoder comes from an ldm_jax workdir (its newest checkpoint, EMA weights when
kept) or from any PyTorch weights `load_autoencoder` reads. An LDM trains on
`(z - shift_factor) * scale_factor`, where z is a posterior sample (KL) or the
pre-quantization latent (VQ, as the reference's `encode` returns it): `normalize`, and
`denormalize` before the first stage decodes. The CompVis and SD VAEs have no shift
(0); SD3's and FLUX.1's VAEs state one in their config.json, as diffusers applies it.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp

from ldm_jax import fs
from ldm_jax.data.latents import sample_latents


def restore_autoencoder(workdir: str, use_ema: bool = True, step: int | None = None):
  """(model, step, has_ema) from a first-stage training workdir's checkpoint."""
  import ml_collections

  from ldm_jax.train import autoencoder_step as step_lib
  from ldm_jax.train import checkpoint
  from ldm_jax.train.autoencoder_setup import abstract_state, build_programs

  config_path = fs.join(workdir, "config.json")
  if not fs.exists(config_path):
    raise FileNotFoundError(f"{config_path} not found: is {workdir} a training workdir?")
  config = ml_collections.ConfigDict(json.loads(fs.read_text(config_path)))
  spec, programs = build_programs(config)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        abstract_state(config, spec, programs))
  state, restored_step = checkpoint.restore_state_only(workdir, target, step)
  model = step_lib.eval_model(programs, state, use_ema=use_ema)
  return model, restored_step, state.ema is not None


def load_first_stage(source: str):
  """An autoencoder from a workdir (a folder with config.json and checkpoints/) or weights,
  local or gs://."""
  if not source:
    raise ValueError("no first stage configured: set first_stage.path to an ldm_jax "
                     "autoencoder workdir or to PyTorch autoencoder weights")
  if fs.isdir(fs.join(source, "checkpoints")):
    return restore_autoencoder(source)[0]
  from ldm_jax.convert import load_autoencoder
  return load_autoencoder(source)


def initial_normalization(first_stage_config) -> tuple[float, float]:
  """(scale, shift) a new run starts from: the config's `scale_factor` / `shift_factor`,
  or with `latent_scaling="auto"` what the VAE folder's config.json states (diffusers'
  `scaling_factor` / `shift_factor`), logged either way. scale_by_std replaces them from
  the first batch; a resumed run keeps its checkpoint's."""
  from absl import logging
  cfg = first_stage_config
  scale, shift = float(cfg.scale_factor), float(cfg.get("shift_factor", 0.0))
  path = cfg.path
  if (cfg.get("latent_scaling", "auto") == "auto" and path and not cfg.scale_by_std
      and not fs.isdir(fs.join(path, "checkpoints"))):
    from ldm_jax.convert.autoencoder import diffusers_latent_scaling
    stated = diffusers_latent_scaling(path) or {}
    if "scaling_factor" in stated or "shift_factor" in stated:
      new = (float(stated.get("scaling_factor", scale)),
             float(stated.get("shift_factor") or 0.0))
      if new != (scale, shift):
        logging.info("latent normalization from %s's config.json: scale %.5f, shift %.5f "
                     "(the config's %.5f, %.5f are not used; first_stage.latent_scaling="
                     "'config' would use them)", path, *new, scale, shift)
      scale, shift = new
  return scale, shift


def encode(model, x: jax.Array, key: jax.Array) -> jax.Array:
  """Unscaled latents of images in [-1, 1]: a posterior sample (KL) or pre-quant z (VQ)."""
  if model.spec.kind == "kl":
    return model.encode(x).sample(key)
  return model.encode(x)


def encode_mean(model, x: jax.Array) -> jax.Array:
  """Unscaled latents without sampling: the posterior mean (KL) or pre-quant z (VQ)."""
  if model.spec.kind == "kl":
    return model.encode(x).mean
  return model.encode(x)


def batch_latents(model, batch: dict, key: jax.Array) -> jax.Array:
  """Unscaled latents of a batch: sampled from cached moments when it has them (a latent
  cache), else encoded from its images."""
  if "mean" in batch:
    return sample_latents(batch, key)
  return encode(model, batch["image"], key)


def normalize(z: jax.Array, latent_norm) -> jax.Array:
  """The first stage's latents as the diffusion model sees them; `latent_norm` is
  (scale, shift)."""
  scale, shift = latent_norm
  return (z - shift) * scale


def denormalize(latents: jax.Array, latent_norm) -> jax.Array:
  """`normalize` undone: what the first stage decodes."""
  scale, shift = latent_norm
  return latents / scale + shift


def std_normalization(latents: jax.Array, shift: bool = False) -> tuple[jax.Array, jax.Array]:
  """scale_by_std: (1 / std, 0) of the first batch's latents (all of it, over every host),
  with the unbiased std the reference's `torch.std` takes. With `shift`, (1 / std, mean):
  the latents centred too, the normalization SD3 and FLUX.1 state for their VAEs."""
  z = latents.astype(jnp.float32)
  std = jnp.std(z, ddof=1)
  center = jnp.mean(z) if shift else jnp.zeros((), jnp.float32)
  return 1.0 / jnp.maximum(std, 1e-12), center


def scale_by_std(model, batch: dict, rng: jax.Array,
                 shift: bool = False) -> tuple[jax.Array, jax.Array]:
  """scale_by_std: `std_normalization` of a first batch's latents, a posterior sample drawn
  with `rng` (key data). An LDM runs it at step 0 with its state's rng,
  `key(train.seed)`; an autoencoder run at its end, on the first batch of its own training
  data with `key(train.seed)` too, so the scale its export states is the one an LDM with
  the same data and seed measures."""
  z = batch_latents(model, batch, jax.random.wrap_key_data(rng))
  return std_normalization(z, shift)
