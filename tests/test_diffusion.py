"""Schedules and samplers against diffusers' schedulers, on a toy model both sides share."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       PNDMScheduler)

from ldm_jax.diffusion import samplers
from ldm_jax.diffusion.schedules import Schedule, beta_schedule, q_sample, target, to_eps_x0

START, END, T = 0.00085, 0.012, 1000
SCHEDULE = Schedule(beta_schedule("linear", T, START, END))
SHAPE = (2, 4, 4, 3)


def toy(x, t):
  """A smooth deterministic 'network' of x and t, the same formula in numpy and JAX: near
  the eps of a zero image, so samples stay of order one as they would with a real model."""
  xp = jnp if isinstance(x, jax.Array) else np
  t = xp.asarray(t).reshape((-1,) + (1,) * (x.ndim - 1))
  noise_level = xp.sqrt(1.0 - xp.asarray(SCHEDULE.alphas_cumprod, xp.float32)[t])
  return 0.9 * x * noise_level + 0.1 * xp.sin(t.astype(xp.float32) / 150.0 + x)


def _torch_toy(x, t):
  out = toy(x.numpy(), np.full((x.shape[0],), int(t)))
  return torch.from_numpy(np.asarray(out, np.float32))


def _x_start(seed=0):
  return np.random.default_rng(seed).normal(size=SHAPE).astype(np.float32)


def _run_diffusers(scheduler, x, steps, noises=None):
  scheduler.set_timesteps(steps)
  sample = torch.from_numpy(x.copy())
  used = []
  for i, t in enumerate(scheduler.timesteps):
    used.append(int(t))
    kwargs = {}
    if noises is not None:
      kwargs["variance_noise"] = torch.from_numpy(noises[i])
    sample = scheduler.step(_torch_toy(sample, t), t, sample, **kwargs).prev_sample
  return sample.numpy(), used


def _common(**extra):
  return dict(num_train_timesteps=T, beta_start=START, beta_end=END,
              beta_schedule="scaled_linear", **extra)


@pytest.mark.parametrize("name,theirs", [("linear", "scaled_linear"),
                                         ("sqrt_linear", "linear"),
                                         ("cosine", "squaredcos_cap_v2")])
def test_schedules_match_diffusers(name, theirs):
  ours = beta_schedule(name, T, START, END)
  reference = DDPMScheduler(num_train_timesteps=T, beta_start=START, beta_end=END,
                            beta_schedule=theirs).betas.numpy()
  # diffusers builds the cosine schedule from the continuous alpha_bar(t) without the
  # renormalisation by alpha_bar(0); the two agree to ~1e-5.
  np.testing.assert_allclose(ours, reference, atol=2e-5 if name == "cosine" else 1e-7)


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_ddim_matches_diffusers(parameterization):
  x = _x_start()
  scheduler = DDIMScheduler(**_common(steps_offset=1, set_alpha_to_one=False,
                                      clip_sample=False,
                                      prediction_type="epsilon" if parameterization == "eps"
                                      else "v_prediction"))
  theirs, used = _run_diffusers(scheduler, x, 10)
  np.testing.assert_array_equal(sorted(used), samplers.ddim_timesteps(T, 10))
  ours = jax.jit(lambda x: samplers.ddim(toy, x, SCHEDULE, 10,
                                         parameterization=parameterization))(jnp.asarray(x))
  np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_ddim_with_eta_matches_diffusers_given_the_same_noise():
  x, steps, key = _x_start(1), 8, jax.random.key(3)
  keys = jax.random.split(key, steps)[::-1]
  noises = [np.asarray(jax.random.normal(k, SHAPE)) for k in keys]
  scheduler = DDIMScheduler(**_common(steps_offset=1, set_alpha_to_one=False,
                                      clip_sample=False))
  scheduler.set_timesteps(steps)
  sample = torch.from_numpy(x.copy())
  for i, t in enumerate(scheduler.timesteps):
    sample = scheduler.step(_torch_toy(sample, t), t, sample, eta=0.7,
                            variance_noise=torch.from_numpy(noises[i])).prev_sample
  ours = samplers.ddim(toy, jnp.asarray(x), SCHEDULE, steps, eta=0.7, key=key)
  np.testing.assert_allclose(ours, sample.numpy(), atol=1e-5)


def test_plms_matches_diffusers_pndm():
  x = _x_start(2)
  scheduler = PNDMScheduler(**_common(steps_offset=1, set_alpha_to_one=False,
                                      skip_prk_steps=True))
  theirs, _ = _run_diffusers(scheduler, x, 12)
  ours = jax.jit(lambda x: samplers.plms(toy, x, SCHEDULE, 12))(jnp.asarray(x))
  np.testing.assert_allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 2, 10])
def test_dpmpp_2m_matches_diffusers(steps):
  x = _x_start(3)
  scheduler = DPMSolverMultistepScheduler(**_common(algorithm_type="dpmsolver++",
                                                    solver_order=2))
  theirs, used = _run_diffusers(scheduler, x, steps)
  np.testing.assert_array_equal(used, samplers.dpmpp_2m_timesteps(T, steps))
  ours = jax.jit(lambda x: samplers.dpmpp_2m(toy, x, SCHEDULE, steps))(jnp.asarray(x))
  np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_ddpm_matches_diffusers_given_the_same_noise():
  short = Schedule(beta_schedule("linear", 50, 0.0015, 0.0195))
  x, key = _x_start(4), jax.random.key(5)
  keys = jax.random.split(key, 50)
  scheduler = DDPMScheduler(num_train_timesteps=50, beta_start=0.0015, beta_end=0.0195,
                            beta_schedule="scaled_linear", clip_sample=False)
  scheduler.set_timesteps(50)
  sample = torch.from_numpy(x.copy())
  for i, t in enumerate(scheduler.timesteps):
    # diffusers draws its own noise: take its mean and std, and add ours.
    theirs = torch.randn(SHAPE, generator=torch.Generator().manual_seed(i))
    step = scheduler.step(_torch_toy(sample, t), t, sample,
                          generator=torch.Generator().manual_seed(i)).prev_sample
    std = scheduler._get_variance(t) ** 0.5 if int(t) > 0 else 0.0
    ours = torch.from_numpy(np.asarray(jax.random.normal(keys[i], SHAPE)))
    sample = step - std * theirs + std * ours
  result = samplers.ddpm(toy, jnp.asarray(x), short, key=key)
  np.testing.assert_allclose(result, sample.numpy(), atol=1e-4)


def test_parameterizations_round_trip():
  rng = np.random.default_rng(0)
  x0, noise = (jnp.asarray(rng.normal(size=SHAPE), jnp.float32) for _ in range(2))
  t = jnp.array([10, 900])
  x_t = q_sample(SCHEDULE, x0, t, noise)
  ab = SCHEDULE.table("alphas_cumprod")[t]
  for name in ("eps", "x0", "v"):
    eps, x0_back = to_eps_x0(name, target(name, x0, noise, ab), x_t, ab)
    np.testing.assert_allclose(eps, noise, atol=2e-4, err_msg=name)
    np.testing.assert_allclose(x0_back, x0, atol=2e-4, err_msg=name)


def test_guidance_interpolates_and_extrapolates():
  def model(x, t, cond):
    return x * cond[:, None, None, None]
  x = jnp.ones(SHAPE)
  t = jnp.zeros((2,), jnp.int32)
  cond, uncond = jnp.array([2.0, 3.0]), jnp.array([1.0, 1.0])
  np.testing.assert_allclose(samplers.guided(model, cond, uncond, 1.0)(x, t), model(x, t, cond))
  np.testing.assert_allclose(samplers.guided(model, cond, uncond, 0.0)(x, t),
                             model(x, t, uncond))
  np.testing.assert_allclose(samplers.guided(model, cond, uncond, 3.0)(x, t)[:, 0, 0, 0],
                             1 + 3 * (cond - 1))


def test_bad_arguments():
  with pytest.raises(ValueError, match="unknown beta schedule"):
    beta_schedule("quadratic", 10)
  with pytest.raises(ValueError, match="between 1 and"):
    samplers.ddim_timesteps(100, 200)
  with pytest.raises(ValueError, match="unknown sampler"):
    samplers.sample("euler", toy, jnp.zeros(SHAPE), SCHEDULE, 4)
