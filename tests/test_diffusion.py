"""Schedules and samplers against diffusers' schedulers, on a toy model both sides share."""

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       PNDMScheduler)

from ldm_jax.diffusion import samplers
from ldm_jax.diffusion.schedules import Schedule, beta_schedule, q_sample, target, to_eps_x0
from conftest import cpu_env

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
  # diffusers' "squaredcos_cap_v2" takes betas as ratios of the continuous alpha_bar(t) with
  # the same s=0.008 and cap 0.999; the reference divides alpha_bar by alpha_bar(0) first,
  # which cancels in the ratio. So they differ only where diffusers rounds: it stores betas
  # in float32 (our float64 betas cast to float32 are bit-equal), while its linear
  # schedules are built by torch.linspace in float32 (differences ~1e-9).
  if name == "cosine":
    np.testing.assert_array_equal(ours.astype(np.float32), reference)
  np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-8)


# 7 steps do not divide T: the reference's range() would give an 8th timestep past the
# table; we keep 7, as diffusers does.
@pytest.mark.parametrize("parameterization,steps", [("eps", 10), ("v", 10), ("eps", 7)])
def test_ddim_matches_diffusers(parameterization, steps):
  x = _x_start()
  scheduler = DDIMScheduler(**_common(steps_offset=1, set_alpha_to_one=False,
                                      clip_sample=False,
                                      prediction_type="epsilon" if parameterization == "eps"
                                      else "v_prediction"))
  theirs, used = _run_diffusers(scheduler, x, steps)
  np.testing.assert_array_equal(sorted(used), samplers.ddim_timesteps(T, steps))
  ours = jax.jit(lambda x: samplers.ddim(toy, x, SCHEDULE, steps,
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


def _prediction_type(parameterization):
  return {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[parameterization]


def test_plms_matches_diffusers_pndm():
  x = _x_start(2)
  scheduler = PNDMScheduler(**_common(steps_offset=1, set_alpha_to_one=False,
                                      skip_prk_steps=True))
  theirs, used = _run_diffusers(scheduler, x, 12)
  # PNDM evaluates its first timestep twice (the improved Euler step).
  np.testing.assert_array_equal(sorted(set(used)), samplers.ddim_timesteps(T, 12))
  ours = jax.jit(lambda x: samplers.plms(toy, x, SCHEDULE, 12))(jnp.asarray(x))
  np.testing.assert_allclose(ours, theirs, atol=1e-5)


def _as(parameterization, eps_fn):
  """The same model, reporting its prediction as x0 or v instead of eps."""
  def fn(x, t):
    eps = eps_fn(x, t)
    ab = SCHEDULE.table("alphas_cumprod")[t].reshape(-1, 1, 1, 1)
    x0 = (x - jnp.sqrt(1 - ab) * eps) / jnp.sqrt(ab)
    return x0 if parameterization == "x0" else jnp.sqrt(ab) * eps - jnp.sqrt(1 - ab) * x0
  return fn


@pytest.mark.parametrize("name", ["plms", "dpmpp_2m", "ddim"])
@pytest.mark.parametrize("parameterization", ["v", "x0"])
def test_samplers_see_the_same_model_whatever_it_predicts(name, parameterization):
  """PLMS runs its multistep formula on eps, each output converted at its own (x_t, t).
  (diffusers' PNDMScheduler instead averages raw v outputs and converts the average at
  the current step, so for v it is not a reference: the two differ by ~10%.)"""
  x = jnp.asarray(_x_start(6))
  want = samplers.sample(name, toy, x, SCHEDULE, 7)
  got = samplers.sample(name, _as(parameterization, toy), x, SCHEDULE, 7,
                        parameterization=parameterization)
  np.testing.assert_allclose(got, want, atol=1e-4)


# 20 steps: diffusers drops to first order at the end only below 15 steps unless the final
# noise level is zero (its default), which makes the last step first order at any count.
@pytest.mark.parametrize("parameterization,steps", [("eps", 1), ("eps", 2), ("eps", 10),
                                                    ("v", 20)])
def test_dpmpp_2m_matches_diffusers(parameterization, steps):
  x = _x_start(3)
  scheduler = DPMSolverMultistepScheduler(**_common(
      algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
      prediction_type=_prediction_type(parameterization)))
  theirs, used = _run_diffusers(scheduler, x, steps)
  np.testing.assert_array_equal(used, samplers.dpmpp_2m_timesteps(T, steps))
  ours = jax.jit(lambda x: samplers.dpmpp_2m(toy, x, SCHEDULE, steps,
                                             parameterization=parameterization))(
                                                 jnp.asarray(x))
  np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_ddim_quad_spacing_against_a_plain_loop():
  """diffusers has no quad spacing: check its timesteps by hand and the loop in numpy."""
  ts = samplers.ddim_timesteps(T, 10, "quad")
  # (linspace(0, sqrt(800), 10)**2).astype(int) + 1
  np.testing.assert_array_equal(ts, [1, 10, 40, 89, 159, 247, 356, 484, 633, 801])
  ab = SCHEDULE.alphas_cumprod
  x = _x_start(5).astype(np.float64)
  for i in range(len(ts) - 1, -1, -1):
    a, a_prev = ab[ts[i]], ab[ts[i - 1]] if i else ab[0]
    eps = toy(x.astype(np.float32), np.full((x.shape[0],), ts[i])).astype(np.float64)
    x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
    x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
  ours = jax.jit(lambda x: samplers.ddim(toy, x, SCHEDULE, 10, spacing="quad"))(
      jnp.asarray(_x_start(5)))
  np.testing.assert_allclose(ours, x, atol=1e-5)


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


def test_guidance_makes_one_batched_call_with_pytree_conditions():
  calls = []

  def model(x, t, cond):
    calls.append(x.shape[0])
    return x * cond["scale"][:, None, None, None] + cond["shift"][:, :1, None, None]

  cond = {"scale": jnp.array([2.0, 3.0]), "shift": jnp.ones((2, 5))}
  negative = {"scale": jnp.array([0.5, 0.5]), "shift": jnp.zeros((2, 5))}
  x, t = jnp.ones(SHAPE), jnp.zeros((2,), jnp.int32)
  out = jax.jit(samplers.guided(model, cond, negative, 4.0))(x, t)
  assert calls == [4]  # [negative, cond] in one call of twice the batch
  expected = 0.5 + 4.0 * (np.array([3.0, 4.0]) - 0.5)
  np.testing.assert_allclose(out[:, 0, 0, 0], expected, rtol=1e-6)


SHARDED = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from ldm_jax.diffusion import samplers
    from ldm_jax.diffusion.schedules import Schedule, beta_schedule

    schedule = Schedule(beta_schedule("linear", 1000, 0.00085, 0.012))
    def model(x, t, cond):
      return 0.3 * x + 0.01 * cond[:, None, None, None] * t[:, None, None, None] / 1000
    mesh = Mesh(np.array(jax.devices()), ("data",))
    batch = NamedSharding(mesh, P("data"))
    x = np.random.default_rng(0).normal(size=(4, 4, 4, 3)).astype(np.float32)
    cond, null = jnp.arange(1.0, 5.0), jnp.zeros(4)
    result = {"devices": jax.device_count()}
    for name in ("ddim", "plms", "dpmpp_2m"):
      run = jax.jit(lambda x, c, u: samplers.sample(
          name, samplers.guided(model, c, u, 3.0), x, schedule, 6))
      sharded = run(jax.device_put(x, batch), jax.device_put(cond, batch),
                    jax.device_put(null, batch))
      plain = run(jnp.asarray(x), cond, null)
      result[name] = [str(sharded.sharding.spec),
                      float(np.abs(np.asarray(sharded) - np.asarray(plain)).max())]
    print("RESULT", json.dumps(result))
""")


def test_samplers_keep_a_batch_sharded_over_a_mesh():
  env = cpu_env(devices=2)
  proc = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True,
                        text=True, timeout=300)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads(lines[-1][len("RESULT "):])
  assert result["devices"] == 2
  for name in ("ddim", "plms", "dpmpp_2m"):
    spec, diff = result[name]
    assert "data" in spec, (name, spec)
    assert diff < 1e-6, (name, diff)


def test_bad_arguments():
  with pytest.raises(ValueError, match="unknown beta schedule"):
    beta_schedule("quadratic", 10)
  with pytest.raises(ValueError, match=r"must lie in \(0, 1\)"):
    Schedule(beta_schedule("sqrt_linear", 10, 0.0, 0.02))
  with pytest.raises(ValueError, match="timesteps=0"):
    beta_schedule("linear", 0)
  with pytest.raises(ValueError, match="between 1 and"):
    samplers.ddim_timesteps(100, 200)
  with pytest.raises(ValueError, match="unknown sampler"):
    samplers.sample("euler", toy, jnp.zeros(SHAPE), SCHEDULE, 4)
  with pytest.raises(ValueError, match="between 1 and"):
    samplers.dpmpp_2m_timesteps(100, 0)
  with pytest.raises(ValueError, match="repeats timesteps"):
    samplers.ddim_timesteps(1000, 1000, "quad")
  with pytest.raises(ValueError, match="unknown DDIM spacing"):
    samplers.ddim_timesteps(1000, 10, "log")
  with pytest.raises(ValueError, match="unknown parameterization"):
    samplers.ddim(toy, jnp.zeros(SHAPE), SCHEDULE, 2, parameterization="score")
  with pytest.raises(ValueError, match="DDIM only"):
    samplers.sample("plms", toy, jnp.zeros(SHAPE), SCHEDULE, 4, eta=0.5)
  with pytest.raises(ValueError, match="pass key"):
    samplers.ddim(toy, jnp.zeros(SHAPE), SCHEDULE, 2, eta=0.5)
