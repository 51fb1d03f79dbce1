"""The discrete forward process of latent diffusion: betas, their products, q(x_t | x_0).

Schedules are computed in float64 with numpy, as the reference does, and enter JAX code as
float32 constants. Names follow latent-diffusion (`make_beta_schedule`):

  linear       linspace(sqrt(start), sqrt(end), T)**2   (diffusers: "scaled_linear")
  sqrt_linear  linspace(start, end, T)                  (diffusers: "linear")
  sqrt         linspace(start, end, T)**0.5
  cosine       Nichol & Dhariwal with offset s, betas clipped to 0.999
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "sqrt_linear", "sqrt", "cosine")
PARAMETERIZATIONS = ("eps", "x0", "v")


def beta_schedule(name: str, timesteps: int, start: float = 1e-4, end: float = 2e-2,
                  cosine_s: float = 8e-3) -> np.ndarray:
  if timesteps < 1:
    raise ValueError(f"diffusion.timesteps={timesteps} must be >= 1")
  if name == "linear":
    return np.linspace(start**0.5, end**0.5, timesteps, dtype=np.float64)**2
  if name == "sqrt_linear":
    return np.linspace(start, end, timesteps, dtype=np.float64)
  if name == "sqrt":
    return np.linspace(start, end, timesteps, dtype=np.float64)**0.5
  if name == "cosine":
    steps = np.arange(timesteps + 1, dtype=np.float64) / timesteps + cosine_s
    alphas_cumprod = np.cos(steps / (1 + cosine_s) * np.pi / 2)**2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    return np.clip(1 - alphas_cumprod[1:] / alphas_cumprod[:-1], 0, 0.999)
  raise ValueError(f"unknown beta schedule {name!r}; choose one of {SCHEDULES}")


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
  """float64 arrays of length T; index t is the noise level of timestep t."""

  betas: np.ndarray

  def __post_init__(self):
    betas = np.asarray(self.betas, np.float64)
    if betas.ndim != 1 or not len(betas):
      raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    if not np.all((betas > 0) & (betas < 1)):
      raise ValueError("betas must lie in (0, 1): check diffusion.linear_start/linear_end "
                       f"(got min {betas.min():.3g}, max {betas.max():.3g})")
    object.__setattr__(self, "betas", betas)

  @classmethod
  def from_config(cls, diffusion) -> "Schedule":
    return cls(beta_schedule(diffusion.beta_schedule, int(diffusion.timesteps),
                             float(diffusion.linear_start), float(diffusion.linear_end),
                             float(diffusion.get("cosine_s", 8e-3))))

  @property
  def timesteps(self) -> int:
    return len(self.betas)

  @property
  def alphas_cumprod(self) -> np.ndarray:
    return np.cumprod(1.0 - self.betas)

  @property
  def alphas_cumprod_prev(self) -> np.ndarray:
    return np.append(1.0, self.alphas_cumprod[:-1])

  def table(self, name: str) -> jax.Array:
    """A float32 constant for use inside jitted code."""
    return jnp.asarray(getattr(self, name), jnp.float32)


def _bcast(values: jax.Array, like: jax.Array) -> jax.Array:
  return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise, t an int array of shape [B]."""
  ab = _bcast(schedule.table("alphas_cumprod")[t], x0)
  return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise


def target(parameterization: str, x0: jax.Array, noise: jax.Array, alpha_bar: jax.Array):
  """What the network is trained to predict."""
  if parameterization == "eps":
    return noise
  if parameterization == "x0":
    return x0
  if parameterization == "v":
    ab = _bcast(alpha_bar, x0)
    return jnp.sqrt(ab) * noise - jnp.sqrt(1.0 - ab) * x0
  raise ValueError(f"unknown parameterization {parameterization!r}; choose one of "
                   f"{PARAMETERIZATIONS}")


def to_eps_x0(parameterization: str, output: jax.Array, x_t: jax.Array,
              alpha_bar: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(eps, x0) implied by a network output at x_t, whatever it predicts."""
  ab = _bcast(alpha_bar, x_t)
  a, s = jnp.sqrt(ab), jnp.sqrt(1.0 - ab)
  if parameterization == "eps":
    return output, (x_t - s * output) / a
  if parameterization == "x0":
    return (x_t - a * output) / s, output
  if parameterization == "v":
    return a * output + s * x_t, a * x_t - s * output
  raise ValueError(f"unknown parameterization {parameterization!r}; choose one of "
                   f"{PARAMETERIZATIONS}")
