"""The LDM objective and condition dropout, against hand computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion.schedules import Schedule, beta_schedule
from ldm_jax.losses.diffusion import DiffusionLossConfig, diffusion_loss, drop_conditions

SCHEDULE = Schedule(beta_schedule("linear", 1000, 0.0015, 0.0195))
X0 = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3, 3, 2)), jnp.float32)
ZERO_LOGVAR = jnp.zeros((1000,))


def _draws(key):
  """The timesteps and noise the loss draws from `key` (the same split)."""
  t_key, noise_key = jax.random.split(key)
  return (np.asarray(jax.random.randint(t_key, (4,), 0, 1000)),
          np.asarray(jax.random.normal(noise_key, X0.shape)))


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_a_perfect_model_has_zero_loss(parameterization):
  key = jax.random.key(0)
  t, noise = _draws(key)
  ab = SCHEDULE.alphas_cumprod[t][:, None, None, None]
  x0 = np.asarray(X0)
  goal = {"eps": noise, "x0": x0, "v": np.sqrt(ab) * noise - np.sqrt(1 - ab) * x0}
  cfg = DiffusionLossConfig(parameterization=parameterization, original_elbo_weight=1.0)
  loss, _ = diffusion_loss(cfg, SCHEDULE, lambda x, t: jnp.asarray(goal[parameterization]),
                           X0, key, ZERO_LOGVAR)
  assert abs(float(loss)) < 1e-6


@pytest.mark.parametrize("loss_type", ["l1", "l2"])
def test_loss_by_hand(loss_type):
  key = jax.random.key(1)
  t, noise = _draws(key)
  ab = SCHEDULE.alphas_cumprod[t][:, None, None, None]
  x_t = np.sqrt(ab) * np.asarray(X0) + np.sqrt(1 - ab) * noise
  apply = lambda x, t: 0.5 * x  # a fixed wrong model
  logvar = jnp.linspace(-1, 1, 1000)
  error = 0.5 * x_t - noise
  per = (np.abs(error) if loss_type == "l1" else error**2).mean(axis=(1, 2, 3))
  lv = np.asarray(logvar)[t]
  expected = 2.0 * np.mean(per / np.exp(lv) + lv)
  cfg = DiffusionLossConfig(loss_type=loss_type, l_simple_weight=2.0)
  loss, metrics = diffusion_loss(cfg, SCHEDULE, apply, X0, key, logvar)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss_simple"]), per.mean(), rtol=1e-5)


def test_condition_dropout_rate():
  fields = {"label": jnp.arange(20000) % 7 + 1,
            "tokens": jnp.ones((20000, 3), jnp.int32)}
  null = {"label": jnp.zeros((20000,), jnp.int32), "tokens": jnp.zeros((20000, 3), jnp.int32)}
  out = drop_conditions(fields, null, 0.1, jax.random.key(0))
  dropped = np.asarray(out["label"] == 0)
  sigma = np.sqrt(0.1 * 0.9 / 20000)
  assert abs(dropped.mean() - 0.1) < 4 * sigma
  # Both fields of an example are dropped together.
  np.testing.assert_array_equal(dropped, np.asarray(out["tokens"][:, 0] == 0))
  assert drop_conditions(fields, null, 0.0, jax.random.key(0)) is fields


def test_bad_config():
  with pytest.raises(ValueError, match="loss_type"):
    DiffusionLossConfig(loss_type="huber")
