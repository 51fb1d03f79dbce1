"""The frozen first stage of an LDM: where it comes from, and its latents.

The autoencoder comes from an ldm_jax workdir (its newest checkpoint, EMA weights when
kept) or from any PyTorch weights `load_autoencoder` reads. An LDM trains on
`scale_factor * z`, where z is a posterior sample (KL) or the pre-quantization latent (VQ,
as the reference's `encode` returns it); `decode` undoes the scale and quantizes first.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp

from ldm_jax import fs


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


def decode(model, latents: jax.Array, scale_factor) -> jax.Array:
  return model.decode(latents / scale_factor)


def std_scale_factor(latents: jax.Array) -> jax.Array:
  """scale_by_std: 1 / std of the first batch's latents (all of it, over every host), with
  the unbiased std the reference's `torch.std` takes."""
  std = jnp.std(latents.astype(jnp.float32), ddof=1)
  return 1.0 / jnp.maximum(std, 1e-12)
