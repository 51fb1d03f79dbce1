"""First-stage losses: L1/MSE + LPIPS, KL or codebook regularizer, PatchGAN terms.

The formulas are latent-diffusion's LPIPSWithDiscriminator (KL models) and
taming-transformers' VQLPIPSWithDiscriminator (VQ models). The functions are pure: the
trainer passes the model pieces in as callables, so the losses know nothing of parameters,
optimizers or checkpoints. Everything here computes in float32.

Also here: the spatial transforms of EQ-VAE (Kouzelis et al. 2025, "EQ-VAE: Equivariance
Regularized Latent Space for Improved Generative Image Modeling"), an optional
regularizer for either kind: see `eq_vae_transforms`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
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
  # LPIPS with its linear heads' dropout (p=0.5) in the train step, as the reference's
  # Lightning runs do (the whole module in train mode). Evaluation never drops out.
  lpips_dropout: bool = False
  # EQ-VAE: with this probability per micro-batch the reconstruction terms compare
  # decode(tau(z)) with tau(x) for a random tau (`eq_vae_transforms`); 0 = off.
  eq_vae_prob: float = 0.0
  eq_vae_scales: tuple[float, ...] = (0.25, 0.5, 0.75)  # the paper code's discrete set
  eq_vae_rotations: bool = True  # and a rotation by 90, 180 or 270 degrees

  def __post_init__(self):
    if self.disc_loss not in ("hinge", "vanilla"):
      raise ValueError(f"loss.disc_loss must be 'hinge' or 'vanilla', got {self.disc_loss!r}")
    if self.pixel_loss not in ("l1", "mse"):
      raise ValueError(f"loss.pixel_loss must be 'l1' or 'mse', got {self.pixel_loss!r}")
    scales = self.eq_vae_scales
    if isinstance(scales, (int, float)):
      scales = (scales,)
    try:
      scales = tuple(float(s) for s in scales)
    except (TypeError, ValueError):
      raise ValueError("loss.eq_vae_scales must be a tuple of numbers in (0, 1], got "
                       f"{self.eq_vae_scales!r}") from None
    object.__setattr__(self, "eq_vae_scales", scales)  # a ConfigDict may hand in a list
    if not 0.0 <= float(self.eq_vae_prob) <= 1.0:
      raise ValueError(f"loss.eq_vae_prob={self.eq_vae_prob} must be in [0, 1] (0 = off)")
    bad = [s for s in scales if not 0.0 < s <= 1.0]
    if bad:
      raise ValueError(f"loss.eq_vae_scales={scales}: every scale must be in (0, 1] (EQ-VAE "
                       f"downscales), got {bad}")
    if self.eq_vae_prob > 0 and not eq_vae_transforms(self):
      raise ValueError("loss.eq_vae_prob > 0 but loss.eq_vae_scales has no scale below 1 and "
                       "loss.eq_vae_rotations=False: there is no transform to apply")

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


def gan_active(cfg: LossConfig, step: int) -> bool:
  """Whether the GAN terms count at (host) `step`: before `disc_start`, or with
  `disc_factor` 0, the reference multiplies them by 0, and the train step leaves the
  discriminator out (`autoencoder_step.make_train_step(gan=False)`)."""
  return cfg.disc_factor != 0 and step >= cfg.disc_start


def adaptive_weight(nll_grad: jax.Array, g_grad: jax.Array, disc_weight: float) -> jax.Array:
  """Balances the GAN term against the reconstruction at the decoder's last layer."""
  ratio = jnp.linalg.norm(nll_grad) / (jnp.linalg.norm(g_grad) + 1e-4)
  return sg(jnp.clip(ratio, 0.0, 1e4) * disc_weight)


def reconstruction_loss(cfg: LossConfig, x: jax.Array, xrec: jax.Array,
                        lpips: Callable[[jax.Array, jax.Array], jax.Array] | None):
  """Per-pixel pixel loss plus the per-image LPIPS broadcast to every pixel (the
  reference's `rec_loss` tensor), the pixel term alone, and LPIPS alone."""
  diff = (x - xrec).astype(jnp.float32)
  pixel = jnp.abs(diff) if cfg.pixel_loss == "l1" else diff**2
  rec = pixel
  p_loss = jnp.zeros((x.shape[0],), jnp.float32)
  if cfg.perceptual_weight > 0:
    p_loss = lpips(x, xrec).astype(jnp.float32)
    rec = pixel + cfg.perceptual_weight * p_loss[:, None, None, None]
  return rec, pixel, p_loss


def generator_loss(cfg: LossConfig, *, x: jax.Array, features: jax.Array,
                   last_kernel: jax.Array, to_image: Callable[[jax.Array, jax.Array], jax.Array],
                   regularizer: DiagonalGaussian | jax.Array, discriminator: Callable | None,
                   lpips: Callable | None, step: jax.Array):
  """The autoencoder's objective and its logged terms.

  `to_image(kernel, features)` applies the decoder's last conv with `kernel`, so the
  adaptive weight can take gradients of the NLL and GAN terms with respect to that layer
  alone (the reference's `calculate_adaptive_weight`). `regularizer` is the posterior
  (KL models) or the codebook loss (VQ models). `discriminator=None` leaves the GAN term
  out (before `disc_start`, where the reference multiplies it by 0): the loss and its
  gradients are the same, without the discriminator's forward pass and the adaptive
  weight's vjp; `g_loss` and `d_weight` then read 0.
  """
  is_kl = isinstance(regularizer, DiagonalGaussian)
  batch = x.shape[0]

  def heads(kernel):
    xrec = to_image(kernel, features).astype(jnp.float32)
    rec, pixel, p_loss = reconstruction_loss(cfg, x, xrec, lpips)
    if is_kl:
      nll = rec / jnp.exp(cfg.logvar_init) + cfg.logvar_init
      nll_loss = jnp.sum(nll) / batch
    else:
      nll_loss = jnp.mean(rec)
    if discriminator is None:
      return (nll_loss, jnp.zeros((), jnp.float32)), (xrec, rec, pixel, p_loss)
    g_loss = -jnp.mean(discriminator(xrec).astype(jnp.float32))
    return (nll_loss, g_loss), (xrec, rec, pixel, p_loss)

  disc_factor = adopt_weight(cfg.disc_factor, step, cfg.disc_start)
  if discriminator is None:
    (nll_loss, g_loss), (xrec, rec, pixel, p_loss) = heads(last_kernel)
    d_weight = gan_term = jnp.zeros((), jnp.float32)
  else:
    (nll_loss, g_loss), vjp, (xrec, rec, pixel, p_loss) = jax.vjp(heads, last_kernel,
                                                                  has_aux=True)
    (nll_grad,) = vjp((jnp.ones_like(nll_loss), jnp.zeros_like(g_loss)))
    (g_grad,) = vjp((jnp.zeros_like(nll_loss), jnp.ones_like(g_loss)))
    d_weight = adaptive_weight(nll_grad, g_grad, cfg.disc_weight)
    gan_term = d_weight * disc_factor * g_loss
  # rec_loss as the reference logs it (and its configs monitor): the mean of the pixel
  # term plus perceptual_weight * LPIPS; pixel_loss: the pixel term alone (|x - xrec|, or
  # its square with pixel_loss="mse").
  metrics = {"nll_loss": nll_loss, "rec_loss": jnp.mean(rec), "pixel_loss": jnp.mean(pixel),
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


# --- EQ-VAE -----------------------------------------------------------------------------
# Facts from the paper's public code (github.com/zelaki/eqvae, ldm/models/autoencoder.py,
# `AutoencoderKL.training_step`): with probability `p_prior` (0.5 in its config) a step
# draws a downscale s and a rotation k * 90 degrees, k in {1, 2, 3}, applies both to the
# sampled latent (decoder input) and to the input image (F.interpolate bilinear,
# align_corners=False, no antialias, then torch.rot90), and hands (tau(x), decode(tau(z)),
# posterior of the untransformed x) to the unchanged LPIPSWithDiscriminator: the pixel,
# LPIPS and GAN terms (the discriminator too sees tau(x) as real) move to the transformed
# pair, the KL term stays on the full-size posterior. Its code draws s from
# {8/32, ..., 31/32}; its README's alternative is {0.25, 0.5, 0.75}, which is the default
# here, since each distinct scale is one more compiled copy of the micro-step.


def eq_vae_transforms(cfg: LossConfig) -> tuple[tuple[float, int], ...]:
  """The transforms one EQ-VAE draw picks from uniformly: (scale, quarter turns) pairs.

  As in the paper's code a draw scales and rotates together; `eq_vae_scales` containing
  1.0 adds rotation-only transforms, `eq_vae_scales=()` makes them the only ones, and
  `eq_vae_rotations=False` leaves scaling only. The identity is never in the list.
  """
  scales = tuple(dict.fromkeys(cfg.eq_vae_scales)) or (1.0,)
  turns = (1, 2, 3) if cfg.eq_vae_rotations else (0,)
  return tuple((s, k) for s in scales for k in turns if (s, k) != (1.0, 0))


def eq_vae_sizes(cfg: LossConfig) -> tuple[float, ...]:
  """The distinct scales a micro-step may run at, 1.0 (no transform) first. Each is a
  branch of static shapes in the step's `lax.switch`; rotations keep a square's shape."""
  return (1.0,) + tuple(s for s in dict.fromkeys(s for s, _ in eq_vae_transforms(cfg))
                        if s != 1.0)


def eq_vae_draw(cfg: LossConfig, key: jax.Array):
  """One micro-batch's draw: (index into `eq_vae_sizes`, quarter turns, applied?).

  A function of `key` alone, so a resumed run draws the same transforms. Not applied
  gives (0, 0): the untransformed loss.
  """
  transforms = eq_vae_transforms(cfg)
  sizes = eq_vae_sizes(cfg)
  apply_key, pick_key = jax.random.split(key)
  applied = jax.random.uniform(apply_key) < cfg.eq_vae_prob
  pick = jax.random.randint(pick_key, (), 0, len(transforms))
  size_of = jnp.asarray([sizes.index(s) for s, _ in transforms], jnp.int32)
  turns_of = jnp.asarray([k for _, k in transforms], jnp.int32)
  zero = jnp.zeros((), jnp.int32)
  return (jnp.where(applied, size_of[pick], zero), jnp.where(applied, turns_of[pick], zero),
          applied)


def downscale(x: jax.Array, scale: float) -> jax.Array:
  """NHWC bilinear resize by `scale` with half-pixel centers and no antialiasing: what the
  paper's code does with F.interpolate(mode="bilinear", align_corners=False) (an exact
  integer output size is checked before compiling, see `check_eq_vae_sizes`)."""
  if scale == 1.0:
    return x
  b, h, w, c = x.shape
  shape = (b, round(h * scale), round(w * scale), c)
  return jax.image.resize(x.astype(jnp.float32), shape, "linear",
                          antialias=False).astype(x.dtype)


def rotate(x: jax.Array, turns) -> jax.Array:
  """NHWC rotation by `turns` quarter turns (H towards W); `turns` may be traced.

  torch.rot90(dims=[-1, -2]) on NCHW turns the other way; the draws are symmetric
  ({1, 2, 3}), so the distribution of transforms is the paper's. Square inputs only (a
  traced turn must keep the shape): ldm_jax's training crops are square.
  """
  if isinstance(turns, int):
    return jnp.rot90(x, turns, axes=(1, 2))
  return jax.lax.switch(turns, [functools.partial(jnp.rot90, k=k, axes=(1, 2))
                                for k in range(4)], x)


def eq_vae_transform(x: jax.Array, scale: float, turns) -> jax.Array:
  """tau(x): downscale, then rotate (the paper's order), for latents and images alike."""
  return rotate(downscale(x, scale), turns)


def patchgan_size(size: int, n_layers: int) -> int:
  """Side of the PatchGAN's logit map on a `size` input: n_layers k4/s2/p1 convs halve,
  then two k4/s1/p1 convs take one each (256 -> 30 at n_layers=3)."""
  for _ in range(n_layers):
    size //= 2
  return size - 2


def check_eq_vae_sizes(cfg: LossConfig, image_size: int, downsample_factor: int) -> None:
  """Refuses EQ-VAE scales the run's shapes cannot take, before anything is compiled: a
  downscaled latent must have an integer side, and the downscaled image must still give the
  discriminator (and LPIPS, when used) a non-empty output, or the loss would be NaN."""
  if cfg.eq_vae_prob <= 0:
    return
  latent = image_size // downsample_factor
  for scale in eq_vae_sizes(cfg)[1:]:
    side = latent * scale
    if not math.isclose(side, round(side), abs_tol=1e-9) or round(side) < 1:
      raise ValueError(
          f"loss.eq_vae_scales: scale {scale} of the {latent}x{latent} latent "
          f"(data.image_size={image_size} / {downsample_factor}) is {side:g}, not an integer "
          "size; pick scales s with latent_size * s a whole number, e.g. multiples of "
          f"1/{latent}")
    image = round(side) * downsample_factor
    if patchgan_size(image, cfg.disc_num_layers) < 1:
      raise ValueError(
          f"loss.eq_vae_scales: scale {scale} makes {image}x{image} images, too small for the "
          f"{cfg.disc_num_layers}-layer discriminator (empty logit map); use larger scales")
    if cfg.perceptual_weight > 0 and image < 16:
      raise ValueError(
          f"loss.eq_vae_scales: scale {scale} makes {image}x{image} images; LPIPS needs at "
          "least 16x16 (VGG16 pools four times before relu5_3); use larger scales")
