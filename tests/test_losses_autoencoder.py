"""First-stage loss terms against a PyTorch hand computation of the reference formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ldm_jax.losses.autoencoder import (LossConfig, adopt_weight, discriminator_loss,
                                        generator_loss, hinge_d_loss, vanilla_d_loss)
from ldm_jax.models.distributions import DiagonalGaussian

B, H, W, C, F = 2, 8, 8, 3, 4  # batch, image size, channels, decoder feature channels


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  return dict(
      x=rng.uniform(-1, 1, (B, H, W, C)).astype(np.float32),
      features=rng.normal(0, 1, (B, H, W, F)).astype(np.float32),
      kernel=rng.normal(0, 0.3, (3, 3, F, C)).astype(np.float32),  # HWIO, the last conv
      d_weight=rng.normal(0, 0.5, (4, 4, C, 1)).astype(np.float32),  # a one-layer "D"
      moments=rng.normal(0, 0.5, (B, 2, 2, 8)).astype(np.float32),
      lpips=rng.uniform(0, 1, (B,)).astype(np.float32))


def _jax_loss(cfg, v, step, kind="kl"):
  lpips_values = jnp.asarray(v["lpips"])

  def to_image(kernel, f):
    return jax.lax.conv_general_dilated(f, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def disc(image):
    return jax.lax.conv_general_dilated(image, jnp.asarray(v["d_weight"]), (2, 2),
                                        ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  # LPIPS stand-in: a fixed per-image value times the mean |x - xrec| (differentiable).
  def lpips(x, xrec):
    return lpips_values * jnp.mean(jnp.abs(x - xrec), axis=(1, 2, 3))

  regularizer = (DiagonalGaussian.from_moments(jnp.asarray(v["moments"])) if kind == "kl"
                 else jnp.asarray(0.37))
  return generator_loss(cfg, x=jnp.asarray(v["x"]), features=jnp.asarray(v["features"]),
                        last_kernel=jnp.asarray(v["kernel"]), to_image=to_image,
                        regularizer=regularizer, discriminator=disc, lpips=lpips,
                        step=jnp.asarray(step))


def _torch_reference(cfg, v, step, kind="kl"):
  """The reference formulas, written out in PyTorch with autograd for the adaptive weight."""
  t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float64)
  nchw = lambda a: t(a).permute(0, 3, 1, 2)
  x, feats = nchw(v["x"]), nchw(v["features"])
  last = t(v["kernel"]).permute(3, 2, 0, 1).clone().requires_grad_(True)  # OIHW
  d_w = t(v["d_weight"]).permute(3, 2, 0, 1)
  xrec = torch.nn.functional.conv2d(feats, last, padding=1)
  p_loss = t(v["lpips"]) * (x - xrec).abs().mean(dim=(1, 2, 3))
  pixel = (x - xrec).abs() if cfg.pixel_loss == "l1" else (x - xrec)**2
  rec = pixel + cfg.perceptual_weight * p_loss[:, None, None, None]
  if kind == "kl":
    logvar = torch.tensor(cfg.logvar_init, dtype=torch.float64)
    nll = rec / torch.exp(logvar) + logvar
    nll_loss = nll.sum() / B
  else:
    nll_loss = rec.mean()
  logits_fake = torch.nn.functional.conv2d(xrec, d_w, stride=2, padding=1)
  g_loss = -logits_fake.mean()
  nll_grad = torch.autograd.grad(nll_loss, last, retain_graph=True)[0]
  g_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
  d_weight = torch.clamp(torch.norm(nll_grad) / (torch.norm(g_grad) + 1e-4), 0, 1e4).detach()
  d_weight = d_weight * cfg.disc_weight
  disc_factor = cfg.disc_factor if step >= cfg.disc_start else 0.0
  if kind == "kl":
    mean, logvar_z = t(v["moments"]).split(4, dim=-1)
    logvar_z = logvar_z.clamp(-30, 20)
    kl = 0.5 * (mean**2 + logvar_z.exp() - 1 - logvar_z).sum(dim=(1, 2, 3))
    kl_loss = kl.sum() / B
    loss = nll_loss + cfg.kl_weight * kl_loss + d_weight * disc_factor * g_loss
  else:
    loss = nll_loss + d_weight * disc_factor * g_loss + cfg.codebook_weight * 0.37
  return {"total_loss": loss.item(), "nll_loss": nll_loss.item(), "g_loss": g_loss.item(),
          "d_weight": d_weight.item(), "disc_factor": disc_factor}


@pytest.mark.parametrize("kind", ["kl", "vq"])
@pytest.mark.parametrize("pixel_loss,perceptual_weight", [("l1", 1.0), ("mse", 0.1)])
@pytest.mark.parametrize("step", [4, 5])
def test_generator_loss_matches_reference(kind, pixel_loss, perceptual_weight, step):
  cfg = LossConfig(disc_start=5, disc_weight=0.6, kl_weight=1e-2, logvar_init=0.3,
                   pixel_loss=pixel_loss, perceptual_weight=perceptual_weight,
                   codebook_weight=0.8)
  v = _inputs()
  loss, (metrics, _) = _jax_loss(cfg, v, step, kind)
  expected = _torch_reference(cfg, v, step, kind)
  assert metrics["disc_factor"] == expected["disc_factor"]
  for key in ("nll_loss", "g_loss", "d_weight"):
    np.testing.assert_allclose(metrics[key], expected[key], rtol=2e-5, err_msg=key)
  np.testing.assert_allclose(loss, expected["total_loss"], rtol=2e-5)


def test_gan_term_switches_on_at_disc_start():
  cfg = LossConfig(disc_start=5, disc_weight=0.6, perceptual_weight=0.0)
  v = _inputs(1)
  before, (m_before, _) = _jax_loss(cfg, v, 4)
  after, (m_after, _) = _jax_loss(cfg, v, 5)
  assert float(m_before["disc_factor"]) == 0.0 and float(m_after["disc_factor"]) == 1.0
  gan = float(m_after["d_weight"] * m_after["g_loss"])
  np.testing.assert_allclose(float(after) - float(before), gan, rtol=1e-4, atol=1e-6)
  assert abs(gan) > 1e-6

  real, fake = jnp.asarray([0.5, -2.0]), jnp.asarray([0.3, 1.5])
  d_before, _ = discriminator_loss(cfg, real, fake, jnp.asarray(4))
  d_after, _ = discriminator_loss(cfg, real, fake, jnp.asarray(5))
  assert float(d_before) == 0.0
  np.testing.assert_allclose(d_after, float(hinge_d_loss(real, fake)))
  assert float(adopt_weight(1.0, jnp.asarray(10), 10)) == 1.0


def test_discriminator_losses_match_formulas():
  real = np.array([0.5, -2.0, 1.5, 0.9], np.float32)
  fake = np.array([0.3, 1.5, -1.2, -0.1], np.float32)
  hinge = 0.5 * (np.mean(np.maximum(0, 1 - real)) + np.mean(np.maximum(0, 1 + fake)))
  vanilla = 0.5 * (np.mean(np.log1p(np.exp(-real))) + np.mean(np.log1p(np.exp(fake))))
  np.testing.assert_allclose(hinge_d_loss(real, fake), hinge, rtol=1e-6)
  np.testing.assert_allclose(vanilla_d_loss(real, fake), vanilla, rtol=1e-6)
  cfg = LossConfig(disc_loss="vanilla", disc_start=0, disc_factor=0.5)
  loss, metrics = discriminator_loss(cfg, jnp.asarray(real), jnp.asarray(fake), jnp.asarray(0))
  np.testing.assert_allclose(loss, 0.5 * vanilla, rtol=1e-6)
  np.testing.assert_allclose(metrics["logits_real"], real.mean(), rtol=1e-6)


def test_bad_loss_config():
  with pytest.raises(ValueError, match="disc_loss"):
    LossConfig(disc_loss="wgan")
  with pytest.raises(ValueError, match="unknown loss config keys"):
    LossConfig.from_config({"disc_strat": 3})
