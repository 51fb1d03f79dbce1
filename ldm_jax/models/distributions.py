"""The KL autoencoder's posterior, a diagonal Gaussian over the latent (float32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class DiagonalGaussian:
  """Mean and log-variance of q(z|x), NHWC. `logvar` is clipped to [-30, 20] as in CompVis."""

  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
    """Splits the encoder's 2*C channels into mean (first half) and log-variance."""
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self) -> jax.Array:
    return jnp.exp(self.logvar)

  def sample(self, key: jax.Array) -> jax.Array:
    return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

  def mode(self) -> jax.Array:
    return self.mean

  def kl(self, other: "DiagonalGaussian | None" = None) -> jax.Array:
    """KL(self || other) per example, summed over H, W, C; `other` defaults to N(0, I)."""
    axes = tuple(range(1, self.mean.ndim))
    if other is None:
      terms = self.mean**2 + self.var - 1.0 - self.logvar
    else:
      terms = ((self.mean - other.mean)**2 / other.var + self.var / other.var - 1.0
               - self.logvar + other.logvar)
    return 0.5 * jnp.sum(terms, axis=axes)

  def nll(self, sample: jax.Array) -> jax.Array:
    """Negative log-likelihood of `sample` per example, summed over H, W, C."""
    axes = tuple(range(1, self.mean.ndim))
    log_two_pi = jnp.log(2.0 * jnp.pi)
    return 0.5 * jnp.sum(log_two_pi + self.logvar + (sample - self.mean)**2 / self.var,
                         axis=axes)
