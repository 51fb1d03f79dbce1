"""First-stage losses: L1/MSE + LPIPS, KL or codebook regularizer, PatchGAN terms.

The formulas are latent-diffusion's LPIPSWithDiscriminator (KL models) and
taming-transformers' VQLPIPSWithDiscriminator (VQ models). The functions are pure: the
trainer passes the model pieces in as callables, so the losses know nothing of parameters,
optimizers or checkpoints. Everything here computes in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from ldm_jax.models.distributions import DiagonalGaussian

sg = jax.lax.stop_gradient


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The `loss` block of a config."""

  disc_start: int = 50001
  disc_weight: float = 0.5
  disc_factor: float = 1.0
  disc_num_layers: int = 3
  disc_ndf: int = 64
  disc_in_channels: int = 3
  disc_loss: str = "hinge"  # or "vanilla"
  use_actnorm: bool = False
  kl_weight: float = 1e-6
  codebook_weight: float = 1.0
  perceptual_weight: float = 1.0
  logvar_init: float = 0.0
  pixel_loss: str = "l1"  # or "mse" (the sd-vae-ft-mse recipe)
  lpips_weights: str = ""
  lpips_random_init: bool = False

  def __post_init__(self):
    if self.disc_loss not in ("hinge", "vanilla"):
      raise ValueError(f"loss.disc_loss must be 'hinge' or 'vanilla', got {self.disc_loss!r}")
    if self.pixel_loss not in ("l1", "mse"):
      raise ValueError(f"loss.pixel_loss must be 'l1' or 'mse', got {self.pixel_loss!r}")

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> "LossConfig":
    values = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ValueError(f"unknown loss config keys {unknown}; valid keys: {sorted(names)}")
    return cls(**values)


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


def adopt_weight(weight: float, step: jax.Array, threshold: int) -> jax.Array:
  """`weight` from step `threshold` on, 0 before (the GAN warm-up)."""
  return jnp.where(step < threshold, 0.0, weight)


def adaptive_weight(nll_grad: jax.Array, g_grad: jax.Array, disc_weight: float) -> jax.Array:
  """Balances the GAN term against the reconstruction at the decoder's last layer."""
  ratio = jnp.linalg.norm(nll_grad) / (jnp.linalg.norm(g_grad) + 1e-4)
  return sg(jnp.clip(ratio, 0.0, 1e4) * disc_weight)


def reconstruction_loss(cfg: LossConfig, x: jax.Array, xrec: jax.Array,
                        lpips: Callable[[jax.Array, jax.Array], jax.Array] | None):
  """Per-pixel pixel loss plus the per-image LPIPS broadcast to every pixel, and LPIPS alone."""
  diff = (x - xrec).astype(jnp.float32)
  rec = jnp.abs(diff) if cfg.pixel_loss == "l1" else diff**2
  p_loss = jnp.zeros((x.shape[0],), jnp.float32)
  if cfg.perceptual_weight > 0:
    p_loss = lpips(x, xrec).astype(jnp.float32)
    rec = rec + cfg.perceptual_weight * p_loss[:, None, None, None]
  return rec, p_loss


def generator_loss(cfg: LossConfig, *, x: jax.Array, features: jax.Array,
                   last_kernel: jax.Array, to_image: Callable[[jax.Array, jax.Array], jax.Array],
                   regularizer: DiagonalGaussian | jax.Array, discriminator: Callable,
                   lpips: Callable | None, step: jax.Array):
  """The autoencoder's objective and its logged terms.

  `to_image(kernel, features)` applies the decoder's last conv with `kernel`, so the
  adaptive weight can take gradients of the NLL and GAN terms with respect to that layer
  alone (the reference's `calculate_adaptive_weight`). `regularizer` is the posterior
  (KL models) or the codebook loss (VQ models).
  """
  is_kl = isinstance(regularizer, DiagonalGaussian)
  batch = x.shape[0]

  def heads(kernel):
    xrec = to_image(kernel, features).astype(jnp.float32)
    rec, p_loss = reconstruction_loss(cfg, x, xrec, lpips)
    if is_kl:
      nll = rec / jnp.exp(cfg.logvar_init) + cfg.logvar_init
      nll_loss = jnp.sum(nll) / batch
    else:
      nll_loss = jnp.mean(rec)
    g_loss = -jnp.mean(discriminator(xrec).astype(jnp.float32))
    return (nll_loss, g_loss), (xrec, rec, p_loss)

  (nll_loss, g_loss), vjp, (xrec, rec, p_loss) = jax.vjp(heads, last_kernel, has_aux=True)
  (nll_grad,) = vjp((jnp.ones_like(nll_loss), jnp.zeros_like(g_loss)))
  (g_grad,) = vjp((jnp.zeros_like(nll_loss), jnp.ones_like(g_loss)))
  d_weight = adaptive_weight(nll_grad, g_grad, cfg.disc_weight)
  disc_factor = adopt_weight(cfg.disc_factor, step, cfg.disc_start)
  gan_term = d_weight * disc_factor * g_loss
  metrics = {"nll_loss": nll_loss, "rec_loss": jnp.mean(jnp.abs(x - xrec)),
             "p_loss": jnp.mean(p_loss), "g_loss": g_loss, "d_weight": d_weight,
             "disc_factor": disc_factor}
  if is_kl:
    kl_loss = jnp.sum(regularizer.kl()) / batch
    loss = nll_loss + cfg.kl_weight * kl_loss + gan_term
    metrics.update(kl_loss=kl_loss, logvar=jnp.asarray(cfg.logvar_init, jnp.float32))
  else:
    loss = nll_loss + gan_term + cfg.codebook_weight * jnp.mean(regularizer)
    metrics.update(quant_loss=jnp.mean(regularizer))
  metrics["total_loss"] = loss
  return loss, (metrics, xrec)


def discriminator_loss(cfg: LossConfig, logits_real: jax.Array, logits_fake: jax.Array,
                       step: jax.Array):
  """The discriminator's objective, switched on at `disc_start`."""
  d_loss_fn = hinge_d_loss if cfg.disc_loss == "hinge" else vanilla_d_loss
  logits_real = logits_real.astype(jnp.float32)
  logits_fake = logits_fake.astype(jnp.float32)
  disc_factor = adopt_weight(cfg.disc_factor, step, cfg.disc_start)
  loss = disc_factor * d_loss_fn(logits_real, logits_fake)
  return loss, {"disc_loss": loss, "logits_real": jnp.mean(logits_real),
                "logits_fake": jnp.mean(logits_fake)}
