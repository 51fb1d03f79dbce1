"""Samplers over a discrete schedule, each one jit-compilable loop (lax.scan over steps).

A model is `model_fn(x, t) -> output`, t an int32 [B] array, output what the network
predicts (`parameterization`: eps, x0 or v); condition and guidance are closed over
(see `guided`). Nothing here loops on the host, so a batch sharded over a mesh stays
sharded through the whole loop.

- ddpm: ancestral sampling with the posterior variance of q(x_{t-1} | x_t, x_0)
  (fixed-small, log-variance clipped at t = 0 as in the reference).
- ddim: latent-diffusion's DDIM: timesteps `arange(0, T, T // S) + 1` ("uniform") or a
  quadratic spacing ("quad"); the first step's alpha_prev is alphas_cumprod[0], not 1
  (diffusers: steps_offset=1, set_alpha_to_one=False); `eta` scales the noise.
- plms: pseudo linear multistep on DDIM's timesteps: improved Euler (two evaluations) at
  the first step, then Adams-Bashforth of orders 2, 3 and 4 on the history of eps.
- dpmpp_2m: DPM-Solver++ multistep of order 2 with data prediction, timesteps
  `linspace(0, T - 1, S + 1).round()` reversed without the last, first order at the first
  and final steps and a final noise level of zero (diffusers' DPMSolverMultistepScheduler
  defaults with algorithm_type="dpmsolver++", solver_order=2).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.schedules import Schedule, to_eps_x0

SAMPLERS = ("ddpm", "ddim", "plms", "dpmpp_2m")
ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def ddim_timesteps(total: int, steps: int, spacing: str = "uniform") -> np.ndarray:
  """The reference's DDIM timesteps, ascending."""
  if not 1 <= steps <= total:
    raise ValueError(f"sample.steps={steps} must be between 1 and the {total} training steps")
  if spacing == "uniform":
    # When T % S != 0 the reference's range() yields S + 1 timesteps, the last one past the
    # table (T); keeping the first S is what diffusers' "leading" spacing does.
    return np.arange(0, total, total // steps)[:steps] + 1
  if spacing == "quad":
    ts = (np.linspace(0, np.sqrt(total * 0.8), steps)**2).astype(np.int64) + 1
    if steps > 1 and np.any(np.diff(ts) == 0):
      raise ValueError(f"sample.steps={steps} with quad spacing repeats timesteps over "
                       f"{total} training steps; use fewer steps or spacing='uniform'")
    return ts
  raise ValueError(f"unknown DDIM spacing {spacing!r}; choose 'uniform' or 'quad'")


def guided(model_fn: Callable, cond, uncond, scale: float) -> ModelFn:
  """Classifier-free guidance, out = u + scale * (c - u), in one batched model call.

  `model_fn(x, t, cond)`; `uncond` is the null condition or a negative one (a pytree of the
  same structure as `cond`). scale 1 is the conditional model alone.
  """
  if scale == 1.0:
    return lambda x, t: model_fn(x, t, cond)

  def both(x, t):
    doubled = jax.tree.map(lambda u, c: jnp.concatenate([u, c]), uncond, cond)
    out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), doubled)
    out_u, out_c = jnp.split(out, 2)
    return out_u + scale * (out_c - out_u)

  return both


def _at(x: jax.Array, t: int | jax.Array) -> jax.Array:
  return jnp.full((x.shape[0],), t, jnp.int32)


def _bcast(value: jax.Array, like: jax.Array) -> jax.Array:
  return jnp.reshape(value, (1,) * like.ndim)


def ddim(model_fn: ModelFn, x: jax.Array, schedule: Schedule, steps: int, *,
         parameterization: str = "eps", eta: float = 0.0, key: jax.Array | None = None,
         spacing: str = "uniform") -> jax.Array:
  ts = ddim_timesteps(schedule.timesteps, steps, spacing)
  ab = schedule.alphas_cumprod
  alphas, alphas_prev = ab[ts], np.append(ab[0], ab[ts[:-1]])
  sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
  if eta > 0 and key is None:
    raise ValueError("DDIM with eta > 0 draws noise: pass key=")
  keys = jax.random.split(key if key is not None else jax.random.key(0), steps)
  table = [jnp.asarray(a[::-1].copy(), jnp.float32)
           for a in (ts, alphas, alphas_prev, sigmas)]

  def step(x, inputs):
    t, a, a_prev, sigma, step_key = inputs
    eps, x0 = to_eps_x0(parameterization, model_fn(x, _at(x, t)), x, _bcast(a, x))
    x_prev = (jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev - sigma**2) * eps)
    if eta > 0:
      x_prev = x_prev + sigma * jax.random.normal(step_key, x.shape, x.dtype)
    return x_prev, None

  x, _ = jax.lax.scan(step, x, (*table, keys[::-1]))
  return x


# Adams-Bashforth weights on [eps_t, eps_{t+1}, eps_{t+2}, eps_{t+3}] by history length.
_AB = np.array([[0, 0, 0, 0], [3, -1, 0, 0], [23, -16, 5, 0], [55, -59, 37, -9]]) / np.array(
    [[1], [2], [12], [24]])


def plms(model_fn: ModelFn, x: jax.Array, schedule: Schedule, steps: int, *,
         parameterization: str = "eps") -> jax.Array:
  ts = ddim_timesteps(schedule.timesteps, steps)[::-1]
  ab = schedule.alphas_cumprod
  alphas = ab[ts]
  alphas_prev = np.append(ab[ts[1:]], ab[0])  # descending order: next entry, ab[0] last

  def eps_at(x, t, a):
    return to_eps_x0(parameterization, model_fn(x, _at(x, t)), x, _bcast(a, x))[0]

  def ddim_step(x, eps, a, a_prev):
    x0 = (x - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)
    return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev) * eps

  # Step 1: improved Euler, the second evaluation at the next timestep.
  a, a_prev = jnp.float32(alphas[0]), jnp.float32(alphas_prev[0])
  eps = eps_at(x, int(ts[0]), a)
  if steps > 1:
    guess = ddim_step(x, eps, a, a_prev)
    eps_next = eps_at(guess, int(ts[1]), jnp.float32(alphas[1]))
    x_new = ddim_step(x, (eps + eps_next) / 2, a, a_prev)
  else:
    x_new = ddim_step(x, eps, a, a_prev)
  if steps == 1:
    return x_new
  history = jnp.stack([eps, jnp.zeros_like(eps), jnp.zeros_like(eps)])  # newest first
  weights = jnp.asarray(_AB, jnp.float32)

  def step(carry, inputs):
    x, history, count = carry
    t, a, a_prev = inputs
    eps = eps_at(x, t, a)
    w = weights[jnp.minimum(count, 3)]
    prime = w[0] * eps + jnp.tensordot(w[1:], history, axes=1)
    history = jnp.concatenate([eps[None], history[:-1]])
    return (ddim_step(x, prime, a, a_prev), history, count + 1), None

  inputs = tuple(jnp.asarray(v[1:].copy(), dtype) for v, dtype in
                 ((ts, jnp.int32), (alphas, jnp.float32), (alphas_prev, jnp.float32)))
  (x, _, _), _ = jax.lax.scan(step, (x_new, history, jnp.int32(1)), inputs)
  return x


def dpmpp_2m_timesteps(total: int, steps: int) -> np.ndarray:
  if not 1 <= steps <= total:
    raise ValueError(f"sample.steps={steps} must be between 1 and the {total} training steps")
  return np.linspace(0, total - 1, steps + 1).round()[::-1][:-1].astype(np.int64)


def dpmpp_2m(model_fn: ModelFn, x: jax.Array, schedule: Schedule, steps: int, *,
             parameterization: str = "eps") -> jax.Array:
  ts = dpmpp_2m_timesteps(schedule.timesteps, steps)
  ab = schedule.alphas_cumprod[ts]
  alpha = np.append(np.sqrt(ab), 1.0)  # the final level: no noise left
  sigma = np.append(np.sqrt(1.0 - ab), 0.0)
  with np.errstate(divide="ignore"):
    lam = np.log(alpha) - np.log(sigma)  # +inf at the end

  def data_prediction(x, i):
    return to_eps_x0(parameterization, model_fn(x, _at(x, int(ts[i]))), x,
                     jnp.float32(ab[i]))[1]

  def first_order(x, x0, i):
    h = lam[i + 1] - lam[i]
    c_x, c_x0 = np.float32(sigma[i + 1] / sigma[i]), np.float32(-alpha[i + 1] * np.expm1(-h))
    return c_x * x + c_x0 * x0

  x0 = data_prediction(x, 0)
  x = first_order(x, x0, 0)
  if steps == 1:
    return x
  # Middle steps: second order from the last two data predictions.
  mid = np.arange(1, steps - 1)
  coef = []
  for i in mid:
    h, h_prev = lam[i + 1] - lam[i], lam[i] - lam[i - 1]
    r = h_prev / h
    decay = alpha[i + 1] * np.expm1(-h)
    coef.append((sigma[i + 1] / sigma[i], -decay * (1 + 0.5 / r), 0.5 * decay / r))
  if len(mid):
    model_ts = jnp.asarray(ts[mid], jnp.int32)
    abs_ = jnp.asarray(ab[mid], jnp.float32)
    c = jnp.asarray(np.array(coef), jnp.float32)

    def step(carry, inputs):
      x, x0_prev = carry
      t, a, (c_x, c_now, c_prev) = inputs
      x0 = to_eps_x0(parameterization, model_fn(x, _at(x, t)), x, _bcast(a, x))[1]
      return (c_x * x + c_now * x0 + c_prev * x0_prev, x0), None

    (x, x0), _ = jax.lax.scan(step, (x, x0), (model_ts, abs_, c))
  last = steps - 1
  return first_order(x, data_prediction(x, last), last)


def ddpm(model_fn: ModelFn, x: jax.Array, schedule: Schedule, *, key: jax.Array,
         parameterization: str = "eps", clip_x0: bool = False) -> jax.Array:
  """All T steps of ancestral sampling (the reference's p_sample_loop)."""
  betas, ab, ab_prev = schedule.betas, schedule.alphas_cumprod, schedule.alphas_cumprod_prev
  variance = betas * (1.0 - ab_prev) / (1.0 - ab)
  log_variance = np.log(np.append(variance[1], variance[1:]))
  coef_x0 = betas * np.sqrt(ab_prev) / (1.0 - ab)
  coef_xt = (1.0 - ab_prev) * np.sqrt(1.0 - betas) / (1.0 - ab)
  total = schedule.timesteps
  inputs = [jnp.asarray(v[::-1].copy(), jnp.float32)
            for v in (ab, coef_x0, coef_xt, log_variance)]
  ts = jnp.arange(total - 1, -1, -1, dtype=jnp.int32)
  keys = jax.random.split(key, total)

  def step(x, inp):
    t, a, c0, ct, logvar, step_key = inp
    _, x0 = to_eps_x0(parameterization, model_fn(x, _at(x, t)), x, _bcast(a, x))
    if clip_x0:
      x0 = jnp.clip(x0, -1.0, 1.0)
    mean = c0 * x0 + ct * x
    noise = jax.random.normal(step_key, x.shape, x.dtype)
    return mean + jnp.where(t > 0, jnp.exp(0.5 * logvar), 0.0) * noise, None

  x, _ = jax.lax.scan(step, x, (ts, *inputs, keys))
  return x


def sample(name: str, model_fn: ModelFn, x: jax.Array, schedule: Schedule, steps: int, *,
           parameterization: str = "eps", eta: float = 0.0,
           key: jax.Array | None = None) -> jax.Array:
  """One entry point for the CLI and the trainer's sample grids.

  `steps` is ignored by ddpm, which always walks all T training steps.
  """
  if eta != 0 and name != "ddim":
    raise ValueError(f"sample.eta={eta} applies to DDIM only; {name!r} is deterministic "
                     "(ddpm has its own fixed variance): set eta to 0")
  if name == "ddim":
    return ddim(model_fn, x, schedule, steps, parameterization=parameterization, eta=eta,
                key=key)
  if name == "plms":
    return plms(model_fn, x, schedule, steps, parameterization=parameterization)
  if name == "dpmpp_2m":
    return dpmpp_2m(model_fn, x, schedule, steps, parameterization=parameterization)
  if name == "ddpm":
    if key is None:
      raise ValueError("DDPM sampling draws noise: pass key=")
    return ddpm(model_fn, x, schedule, key=key, parameterization=parameterization)
  raise ValueError(f"unknown sampler {name!r}; choose one of {SAMPLERS}")
