"""The LDM training objective (the reference's `p_losses`), and condition dropout.

loss = l_simple_weight * mean_b(loss_simple_b / exp(logvar_t) + logvar_t)
       + original_elbo_weight * mean_b(lvlb_weight_t * loss_simple_b)

loss_simple_b is the l2 (or l1) error between the network output and its target, mean
over H, W, C. `logvar` is a per-timestep table (a trained parameter with learn_logvar,
else the constant logvar_init, 0 by default, which leaves plain MSE).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.schedules import Schedule, q_sample, target


@dataclasses.dataclass(frozen=True)
class DiffusionLossConfig:
  parameterization: str = "eps"
  loss_type: str = "l2"
  l_simple_weight: float = 1.0
  original_elbo_weight: float = 0.0

  def __post_init__(self):
    if self.loss_type not in ("l1", "l2"):
      raise ValueError(f"diffusion.loss_type={self.loss_type!r}: choose 'l1' or 'l2'")
    if self.parameterization not in ("eps", "x0", "v"):
      raise ValueError(f"diffusion.parameterization={self.parameterization!r}: choose eps, "
                       "x0 or v")

  @classmethod
  def from_config(cls, diffusion) -> "DiffusionLossConfig":
    return cls(str(diffusion.parameterization), str(diffusion.loss_type),
               float(diffusion.l_simple_weight), float(diffusion.original_elbo_weight))


def lvlb_weights(schedule: Schedule, parameterization: str) -> np.ndarray:
  """The per-timestep ELBO weights of the reference (index 0 copies index 1)."""
  betas, ab, ab_prev = schedule.betas, schedule.alphas_cumprod, schedule.alphas_cumprod_prev
  if parameterization == "eps":
    posterior_variance = betas * (1.0 - ab_prev) / (1.0 - ab)
    with np.errstate(divide="ignore"):
      weights = betas**2 / (2 * posterior_variance * (1.0 - betas) * (1.0 - ab))
  elif parameterization == "x0":
    weights = 0.5 * np.sqrt(ab) / (2.0 - ab)  # as the reference has it ("2. * 1 - ab")
  else:  # v: uniform, as in the Stable Diffusion 2 code
    weights = np.ones_like(betas)
  weights[0] = weights[1]
  return weights


def diffusion_loss(cfg: DiffusionLossConfig, schedule: Schedule, apply: Callable,
                   x0: jax.Array, key: jax.Array, logvar: jax.Array) -> tuple[jax.Array, dict]:
  """`apply(x_t, t) -> output`; x0 the (scaled) latents; `logvar` the [T] table."""
  t_key, noise_key = jax.random.split(key)
  batch = x0.shape[0]
  t = jax.random.randint(t_key, (batch,), 0, schedule.timesteps)
  noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
  x_t = q_sample(schedule, x0.astype(jnp.float32), t, noise)
  out = apply(x_t, t).astype(jnp.float32)
  goal = target(cfg.parameterization, x0.astype(jnp.float32), noise,
                schedule.table("alphas_cumprod")[t])
  error = jnp.abs(out - goal) if cfg.loss_type == "l1" else (out - goal)**2
  per_example = jnp.mean(error, axis=tuple(range(1, error.ndim)))
  logvar_t = logvar[t]
  loss = cfg.l_simple_weight * jnp.mean(per_example / jnp.exp(logvar_t) + logvar_t)
  weights = jnp.asarray(lvlb_weights(schedule, cfg.parameterization), jnp.float32)
  loss_vlb = jnp.mean(weights[t] * per_example)
  loss = loss + cfg.original_elbo_weight * loss_vlb
  return loss, {"loss": loss, "loss_simple": jnp.mean(per_example), "loss_vlb": loss_vlb,
                "logvar": jnp.mean(logvar)}


def drop_conditions(fields: dict, null: dict, prob: float, key: jax.Array) -> dict:
  """Per example, the null condition with probability `prob` (classifier-free guidance)."""
  if not 0.0 <= prob <= 1.0:
    raise ValueError(f"condition dropout probability {prob} must be in [0, 1]")
  if prob == 0 or not fields:
    return fields
  missing = sorted(set(fields) - set(null))
  if missing:
    raise ValueError(f"no null condition for fields {missing}")
  batch = next(iter(fields.values())).shape[0]
  drop = jax.random.uniform(key, (batch,)) < prob
  return {name: jnp.where(drop.reshape((batch,) + (1,) * (value.ndim - 1)), null[name], value)
          for name, value in fields.items()}
