"""The trained part of a latent diffusion model, as a Flax module that knows nothing of
training: the denoising UNet, the condition encoder and the per-timestep log-variance.

The first stage (the frozen autoencoder) is not part of it: it is loaded on its own and
passed to the step and the sampler beside it (`ldm_jax.train.first_stage`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ldm_jax.models.conditioners import Conditioner
from ldm_jax.models.layers import Buffer
from ldm_jax.models.unet import UNetModel, UNetSpec


class LatentDiffusion(nnx.Module):
  """The trained part of an LDM: denoiser, condition encoder, per-t log-variance."""

  def __init__(self, unet: UNetSpec, conditioner: Conditioner, timesteps: int, *,
               learn_logvar: bool, logvar_init: float, rngs: nnx.Rngs):
    self.unet = UNetModel(unet, rngs=rngs)
    self.cond = conditioner
    table = jnp.full((timesteps,), logvar_init, jnp.float32)
    self.logvar = nnx.Param(table) if learn_logvar else Buffer(table)

  def encode_conditions(self, fields: dict, concat: jax.Array | None = None) -> dict:
    """What `denoise` is conditioned on: the cross-attention context and the concat input
    (either may be None). A pytree, so guidance can batch it with the null condition."""
    return {"context": self.cond(fields), "concat": concat}

  def denoise(self, x_t: jax.Array, t: jax.Array, conditions: dict) -> jax.Array:
    if conditions["concat"] is not None:
      x_t = jnp.concatenate([x_t, conditions["concat"].astype(x_t.dtype)], axis=-1)
    return self.unet(x_t, t, conditions["context"])
