"""Optimizers, the reference learning-rate rule, and the LitEma weight average."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax


def learning_rate(optim: Mapping[str, Any], global_batch: int) -> float:
  """latent-diffusion's rule when scale_lr is on: accumulate * global batch * base_lr.

  (The reference multiplies n_gpus * per-GPU batch, which is the global batch.)
  """
  base = float(optim["base_learning_rate"])
  if not optim.get("scale_lr", True):
    return base
  return int(optim.get("accumulate_grad_batches", 1)) * global_batch * base


def adam(optim: Mapping[str, Any], lr: float) -> optax.GradientTransformation:
  """Adam(b1, b2) as in the references, with optional global-norm clipping first."""
  tx = optax.adam(lr, b1=float(optim.get("b1", 0.5)), b2=float(optim.get("b2", 0.9)))
  clip = float(optim.get("grad_clip_norm", 0.0) or 0.0)
  return optax.chain(optax.clip_by_global_norm(clip), tx) if clip > 0 else tx


def ema_update(ema: Any, params: Any, decay: float, num_updates: jax.Array) -> Any:
  """LitEma: decay_n = min(decay, (1+n)/(10+n)); shadow -= (1-decay_n)*(shadow-param)."""
  n = num_updates.astype(jnp.float32)
  decay_n = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
  return jax.tree.map(lambda e, p: e - (1.0 - decay_n) * (e - p), ema, params)
