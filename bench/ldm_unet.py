"""Benchmark of the LDM UNet: `python bench/ldm_unet.py --config=configs/ldm_txt2img.py:demo`.

Prints, on synthetic latents (the first stage is not run, so the figures are the UNet's
and the condition encoder's):

- the compiled LDM train step (the trainer's `ldm_step.make_train_step`: condition
  dropout, UNet fwd + bwd, AdamW, EMA) and the same UNet's fwd + bwd + AdamW in PyTorch
  on diffusers' UNet2DConditionModel with the same topology (when diffusers can express
  it), as step time and images/s;
- sampling throughput, images/s for `--sample_steps` DDIM steps with guidance (two UNet
  evaluations per step), JAX's compiled loop against a diffusers DDIMScheduler loop.

Not a test: it measures. See bench/README.md.
"""

from __future__ import annotations

import datetime
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from ldm_jax.data.spec import DataSpec
from ldm_jax.diffusion import samplers
from ldm_jax.train import ldm_step
from ldm_jax.train.ldm_setup import build_model, build_programs

_CONFIG = config_flags.DEFINE_config_file("config", None, "An LDM config file.")
_BATCH = flags.DEFINE_integer("batch", None, "Latents per step (data.batch_size).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed train steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", 50, "DDIM steps per sample.")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", 8, "Images per sampling call.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "unet.dtype override.")
_NO_TORCH = flags.DEFINE_bool("no_torch", False, "Skip PyTorch.")
flags.mark_flags_as_required(["config"])


def _time(fn, steps: int, warmup: int) -> list[float]:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def _fields(config, batch: int, rng) -> dict:
  if config.cond.kind == "class":
    return {"label": rng.integers(0, config.cond.num_classes - 1, batch).astype(np.int32)}
  if config.cond.kind == "text":
    return {"tokens": rng.integers(3, 200, (batch, config.cond.max_length)).astype(np.int32)}
  return {}


def _jax_figures(config, spec, programs, batch: int, latent: int):
  rng = np.random.default_rng(0)
  model = build_model(config, spec, 0)
  state = ldm_step.new_state(model, programs, 1.0, 0)
  data = {"mean": jnp.asarray(rng.normal(size=(batch, latent, latent, spec.in_channels)),
                              jnp.float32),
          **{k: jnp.asarray(v) for k, v in _fields(config, batch, rng).items()}}
  step = jax.jit(ldm_step.make_train_step(programs), donate_argnums=(0,))
  start = time.perf_counter()
  compiled = step.lower(state, data, None).compile()
  compile_s = time.perf_counter() - start
  flops = (compiled.cost_analysis() or {}).get("flops", 0.0)
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], data, None)
    jax.block_until_ready(metrics)

  train = _time(run, _STEPS.value, _WARMUP.value)

  n = _SAMPLE_BATCH.value
  fields = {k: jnp.asarray(v) for k, v in _fields(config, n, rng).items()}
  scale = float(config.sample.guidance_scale) if fields else 1.0

  def sample(state, key):
    m = ldm_step.eval_model(programs, state)
    fn = samplers.guided(lambda x, t, c: m.unet(x, t, c), m.cond(fields),
                         m.cond(m.cond.null_fields(n)), scale)
    x = jax.random.normal(key, (n, latent, latent, spec.in_channels))
    return samplers.ddim(fn, x, programs.schedule, _SAMPLE_STEPS.value)

  sampler = jax.jit(sample).lower(holder[0], jax.random.key(0)).compile()
  sampling = _time(lambda: jax.block_until_ready(sampler(holder[0], jax.random.key(1))), 2, 1)
  return compile_s, train, flops / batch, sampling, scale


def _torch_figures(config, spec, batch: int, latent: int, guided: bool):
  import torch
  from diffusers import DDIMScheduler, UNet2DConditionModel

  from ldm_jax.convert.unet import diffusers_config
  try:
    unet_config = {k: v for k, v in diffusers_config(spec).items() if not k.startswith("_")}
  except ValueError as e:
    print(f"torch: skipped ({e})")
    return None
  torch.set_num_threads(os.cpu_count())
  device = "cuda" if torch.cuda.is_available() else "cpu"
  unet = UNet2DConditionModel(sample_size=latent, **unet_config).to(device)
  opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
  x = torch.randn(batch, spec.in_channels, latent, latent, device=device)
  context = torch.randn(batch, 8, spec.context_dim, device=device)

  def step():
    t = torch.randint(0, 1000, (batch,), device=device)
    loss = (unet(x, t, encoder_hidden_states=context).sample - x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if device == "cuda":
      torch.cuda.synchronize()

  train = _time(step, _STEPS.value, _WARMUP.value)
  n = _SAMPLE_BATCH.value
  scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                            steps_offset=1, set_alpha_to_one=False, clip_sample=False)
  unet.eval()

  def sample():
    scheduler.set_timesteps(_SAMPLE_STEPS.value)
    sample = torch.randn(n, spec.in_channels, latent, latent, device=device)
    ctx = torch.randn((2 if guided else 1) * n, 8, spec.context_dim, device=device)
    with torch.no_grad():
      for t in scheduler.timesteps:
        inp = torch.cat([sample, sample]) if guided else sample
        out = unet(inp, t, encoder_hidden_states=ctx).sample
        if guided:
          u, c = out.chunk(2)
          out = u + 3.0 * (c - u)
        sample = scheduler.step(out, t, sample).prev_sample

  sampling = _time(sample, 1, 0)
  return train, sampling, device


def main(argv):
  del argv
  config = _CONFIG.value
  if _BATCH.value:
    config.data.batch_size = _BATCH.value
  if _DTYPE.value:
    config.unet.dtype = _DTYPE.value
  config.first_stage.path = config.first_stage.path or "unused"
  spec, programs = build_programs(config, None)
  data = DataSpec.from_config(config.data)
  batch = data.batch_size
  latent = data.image_size // int(config.first_stage.downsample_factor)
  device = jax.devices()[0]
  print(f"device: {device.platform} ({jax.device_count()} x {device.device_kind}, "
        f"{os.cpu_count()} CPUs)  jax {jax.__version__}")
  print(f"UNet: model_channels {spec.model_channels}, channel_mult {spec.channel_mult}, "
        f"latents {batch} x {latent}x{latent}x{spec.in_channels}, cond {config.cond.kind}, "
        f"dtype {spec.dtype}")
  compile_s, train, flops, sampling, scale = _jax_figures(config, spec, programs, batch,
                                                          latent)
  n, steps = _SAMPLE_BATCH.value, _SAMPLE_STEPS.value
  med = statistics.median(train)
  print(f"jax train step: compiled in {compile_s:.1f} s, median {med:.4f} s, "
        f"{batch / med:.1f} latents/s, {flops / 1e9:.2f} GFLOP/latent (XLA count)")
  print(f"jax sampling: {n} images x {steps} DDIM steps (guidance {scale}) in "
        f"{statistics.median(sampling):.2f} s = {n / statistics.median(sampling):.2f} img/s")
  row = [datetime.date.today().isoformat(), device.platform, f"{med:.4f}",
         f"{n / statistics.median(sampling):.2f}"]
  if not _NO_TORCH.value:
    figures = _torch_figures(config, spec, batch, latent, scale != 1.0)
    if figures:
      t_train, t_sampling, where = figures
      t_med = statistics.median(t_train)
      print(f"torch ({where}) train step: median {t_med:.4f} s; sampling "
            f"{n / statistics.median(t_sampling):.2f} img/s; torch/jax step time "
            f"{t_med / med:.2f}")
      row += [f"{t_med:.4f}", f"{n / statistics.median(t_sampling):.2f}"]
  print("README row: | " + " | ".join(row) + " |")


if __name__ == "__main__":
  app.run(main)
