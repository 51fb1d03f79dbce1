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


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_elbo_term_by_hand(parameterization):
  key = jax.random.key(2)
  t, noise = _draws(key)
  betas = SCHEDULE.betas
  ab = np.cumprod(1 - betas)
  ab_prev = np.concatenate([[1.0], ab[:-1]])
  if parameterization == "eps":
    posterior_var = betas * (1 - ab_prev) / (1 - ab)
    with np.errstate(divide="ignore"):
      weights = betas**2 / (2 * posterior_var * (1 - betas) * (1 - ab))
  elif parameterization == "x0":
    weights = 0.5 * np.sqrt(ab) / (2 - ab)
  else:
    weights = np.ones(len(betas))
  weights[0] = weights[1]
  apply = lambda x, t: jnp.zeros_like(x)
  abt = ab[t][:, None, None, None]
  x0 = np.asarray(X0)
  goal = {"eps": noise, "x0": x0, "v": np.sqrt(abt) * noise - np.sqrt(1 - abt) * x0}
  per = (goal[parameterization]**2).mean(axis=(1, 2, 3))
  cfg = DiffusionLossConfig(parameterization=parameterization, l_simple_weight=0.0,
                            original_elbo_weight=1e-3)
  loss, metrics = diffusion_loss(cfg, SCHEDULE, apply, X0, key, ZERO_LOGVAR)
  np.testing.assert_allclose(float(metrics["loss_vlb"]), np.mean(weights[t] * per), rtol=1e-5)
  np.testing.assert_allclose(float(loss), 1e-3 * np.mean(weights[t] * per), rtol=1e-5)


def test_logvar_gets_a_gradient_only_at_drawn_timesteps():
  key = jax.random.key(3)
  t, _ = _draws(key)
  grad = jax.grad(lambda lv: diffusion_loss(DiffusionLossConfig(), SCHEDULE,
                                            lambda x, t: 0.5 * x, X0, key, lv)[0])(
                                                ZERO_LOGVAR)
  assert set(np.flatnonzero(np.asarray(grad))) == set(t.tolist())


def test_condition_dropout_rate():
  fields = {"label": jnp.arange(20000) % 7 + 1,
            "tokens": jnp.ones((20000, 3), jnp.int32),
            "context": jnp.ones((20000, 2, 4), jnp.float32)}
  # A null condition may be given once, for the whole batch.
  null = {"label": jnp.zeros((20000,), jnp.int32), "tokens": jnp.zeros((20000, 3), jnp.int32),
          "context": jnp.zeros((1, 2, 4), jnp.float32)}
  out = drop_conditions(fields, null, 0.1, jax.random.key(0))
  dropped = np.asarray(out["label"] == 0)
  sigma = np.sqrt(0.1 * 0.9 / 20000)
  assert abs(dropped.mean() - 0.1) < 4 * sigma
  # Both fields of an example are dropped together.
  np.testing.assert_array_equal(dropped, np.asarray(out["tokens"][:, 0] == 0))
  np.testing.assert_array_equal(dropped, np.asarray(jnp.all(out["context"] == 0, (1, 2))))
  assert out["context"].shape == (20000, 2, 4)
  assert drop_conditions(fields, null, 0.0, jax.random.key(0)) is fields


def test_bad_config():
  with pytest.raises(ValueError, match="loss_type"):
    DiffusionLossConfig(loss_type="huber")
  with pytest.raises(ValueError, match="parameterization"):
    DiffusionLossConfig(parameterization="score")
  fields = {"label": jnp.ones((4,), jnp.int32)}
  with pytest.raises(ValueError, match="in \\[0, 1\\]"):
    drop_conditions(fields, fields, 1.5, jax.random.key(0))
  with pytest.raises(ValueError, match="no null condition"):
    drop_conditions(fields, {}, 0.1, jax.random.key(0))
