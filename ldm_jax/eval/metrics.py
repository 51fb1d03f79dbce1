"""Per-image reconstruction metrics in JAX: PSNR and SSIM on the [0, 255] scale.

Images come in [-1, 1] (NHWC) and are mapped to [0, 255] and clipped, as the
latent-diffusion README's numbers are computed on 8-bit images. SSIM follows Wang et al.
2004 with a Gaussian window (sigma 1.5, 11 taps, K1 0.01, K2 0.03, population
covariance), as scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=255)`: statistics are averaged over the positions
where the whole window fits, then over channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def to_255(x: jax.Array) -> jax.Array:
  return jnp.clip((x.astype(jnp.float32) + 1.0) * 127.5, 0.0, 255.0)


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
  """Per-image PSNR in dB of two [-1, 1] NHWC batches (on the 0..255 scale)."""
  mse = jnp.mean((to_255(x) - to_255(y))**2, axis=(1, 2, 3))
  return 10.0 * jnp.log10(255.0**2 / jnp.maximum(mse, 1e-10))


def _gaussian_window(sigma: float = 1.5, truncate: float = 3.5) -> np.ndarray:
  radius = int(truncate * sigma + 0.5)
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma)**2)
  return (taps / taps.sum()).astype(np.float32)


def _filter(x: jax.Array, taps: np.ndarray) -> jax.Array:
  """Separable 'valid' Gaussian filter per channel of an NHWC batch."""
  c = x.shape[-1]
  k = jnp.asarray(taps)
  rows = jnp.tile(k[:, None, None, None], (1, 1, 1, c))  # (kh, 1, 1, c) depthwise
  cols = jnp.tile(k[None, :, None, None], (1, 1, 1, c))
  dn = ("NHWC", "HWIO", "NHWC")
  precision = jax.lax.Precision.HIGHEST
  x = jax.lax.conv_general_dilated(x, rows, (1, 1), "VALID", dimension_numbers=dn,
                                   feature_group_count=c, precision=precision)
  return jax.lax.conv_general_dilated(x, cols, (1, 1), "VALID", dimension_numbers=dn,
                                      feature_group_count=c, precision=precision)


def ssim(x: jax.Array, y: jax.Array, data_range: float = 255.0) -> jax.Array:
  """Per-image SSIM of two [-1, 1] NHWC batches, computed on the 0..255 scale."""
  x, y = to_255(x), to_255(y)
  taps = _gaussian_window()
  if min(x.shape[1:3]) < taps.size:
    raise ValueError(f"SSIM needs images of at least {taps.size}x{taps.size}, got "
                     f"{x.shape[1]}x{x.shape[2]}")
  c1, c2 = (0.01 * data_range)**2, (0.03 * data_range)**2
  mu_x, mu_y = _filter(x, taps), _filter(y, taps)
  var_x = _filter(x * x, taps) - mu_x**2
  var_y = _filter(y * y, taps) - mu_y**2
  cov = _filter(x * y, taps) - mu_x * mu_y
  s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
  return jnp.mean(s, axis=(1, 2, 3))
