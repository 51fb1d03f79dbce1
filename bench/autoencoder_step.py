"""Benchmark of the first-stage train step: `python bench/autoencoder_step.py --config=...`.

Times three steps on one synthetic batch, so the figures can be compared across machines
and against PyTorch:

- the full JAX GAN step the trainer runs (generator fwd+bwd with the adaptive-weight vjp,
  discriminator fwd+bwd, LPIPS when the config uses it, both Adam updates);
- a JAX autoencoder-only step: encode -> sample -> decode, L1 loss, backward, Adam;
- the same autoencoder-only step in PyTorch on diffusers' AutoencoderKL / VQModel.

The last two do the same work, so their ratio compares the frameworks; the first is what
training costs. Not a test: it checks nothing, it measures. See bench/README.md.
"""

from __future__ import annotations

import datetime
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from ldm_jax.data.spec import DataSpec
from ldm_jax.models.autoencoder import build_autoencoder
from ldm_jax.models.lpips import make_lpips
from ldm_jax.train import autoencoder_step as step_lib
from ldm_jax.train.autoencoder_setup import build_programs
from ldm_jax.train.optim import adam, learning_rate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file, e.g. configs/kl_f8.py or configs/kl_f8.py:demo; "
    "fields can be overridden, e.g. --config.optim.accumulate_grad_batches=1.")
_BATCH = flags.DEFINE_integer("batch", None, "Images per micro-batch (data.batch_size).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Compute dtype (model.dtype); default: the config's.")
_RESOLUTION = flags.DEFINE_integer("resolution", None,
                                   "Image side (data.image_size); default: the config's.")
_NO_TORCH = flags.DEFINE_bool("no_torch", False, "Skip the PyTorch step.")
_SKIP_GAN = flags.DEFINE_bool("skip_gan", False,
                              "Skip the full GAN step (on CPU it can take minutes per step).")
_PEAK = flags.DEFINE_float("peak_tflops", None,
                           "Peak TFLOP/s of the device for MFU; default: known GPUs/TPUs by "
                           "device kind for the dtype, none elsewhere; 0 turns MFU off.")
flags.mark_flags_as_required(["config"])

# Dense peak TFLOP/s (bfloat16, float32) by a substring of jax's device_kind, first match
# wins. The float32 figures are the non-tensor-core rate; XLA may use TF32 tensor cores for
# float32 convolutions on GPU, so float32 MFU can exceed what these peaks suggest.
PEAKS = (
    ("H100 PCIe", (756.0, 51.0)),
    ("H100", (989.0, 67.0)),
    ("H200", (989.0, 67.0)),
    ("A100", (312.0, 19.5)),
    ("TPU v4", (275.0, None)),
    ("TPU v5 lite", (197.0, None)),  # v5e
    ("TPU v5p", (459.0, None)),
    ("TPU v6", (918.0, None)),
)


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """The flag's value, else the table's for this device and dtype, else None (no MFU)."""
  if _PEAK.value is not None:
    return _PEAK.value or None
  for name, (bf16, fp32) in PEAKS:
    if name.lower() in device_kind.lower():
      return bf16 if dtype == "bfloat16" else fp32
  return None


def compiled_flops(compiled) -> float | None:
  """Total FLOPs XLA counts for one call of a compiled function (None if it cannot say)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):  # older jax returns one dict per device program
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def time_steps(run_once, warmup: int, steps: int) -> list[float]:
  """Seconds of each of `steps` calls of run_once() (which blocks) after `warmup` calls."""
  for _ in range(warmup):
    run_once()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    run_once()
    times.append(time.perf_counter() - start)
  return times


def configure():
  """The config with the command line's batch, resolution and dtype applied."""
  config = _CONFIG.value
  if _BATCH.value is not None:
    config.data.batch_size = _BATCH.value
  if _RESOLUTION.value is not None:
    # Only the data changes: model.resolution decides the attention levels, and the
    # network is convolutional, so the topology stays the config's.
    config.data.image_size = _RESOLUTION.value
  if _DTYPE.value is not None:
    config.model.dtype = _DTYPE.value
  return config


def jax_gan_step(config, images: np.ndarray) -> dict:
  """Compiles and times the trainer's step (generator + discriminator [+ LPIPS])."""
  lpips_def = lpips_state = None
  if config.loss.perceptual_weight > 0:
    # Random VGG weights cost the same FLOPs as the real ones, which cannot ship offline.
    lpips_def, lpips_state = nnx.split(make_lpips(None, random_init=True))
  spec, programs = build_programs(config, lpips_def)
  seed = int(config.train.seed)
  state = step_lib.new_state(build_autoencoder(spec, nnx.Rngs(seed)),
                             step_lib.build_discriminator(programs.loss, spec.dtype, seed),
                             programs, bool(config.train.decoder_only), seed)
  batch = {"image": jnp.asarray(images)}
  start = time.perf_counter()
  compiled = jax.jit(step_lib.make_train_step(programs), donate_argnums=0).lower(
      state, batch, lpips_state).compile()
  compile_s = time.perf_counter() - start
  print(f"jax GAN step compiled in {compile_s:.1f} s", flush=True)
  holder = [state]

  def run_once():
    holder[0], metrics = compiled(holder[0], batch, lpips_state)
    jax.block_until_ready(metrics)

  times = time_steps(run_once, _WARMUP.value, _STEPS.value)
  # The micro-batch loop is unrolled in the step, so XLA's count covers all of them.
  flops = compiled_flops(compiled)
  return dict(times=times, compile_s=compile_s, flops=flops,
              images=images.shape[0] * images.shape[1])


def jax_autoencoder_step(config, images: np.ndarray) -> dict:
  """Compiles and times encode -> sample -> decode, L1, backward, Adam (the torch twin)."""
  spec, _ = build_programs(config)
  model_def, params, rest = nnx.split(build_autoencoder(spec, nnx.Rngs(0)), nnx.Param, ...)
  tx = adam(config.optim, learning_rate(config.optim,
                                        DataSpec.from_config(config.data).batch_size))

  def step(params, opt_state, x, key):
    def loss_fn(p):
      xrec, _ = nnx.merge(model_def, p, rest, copy=True)(x, key)
      return jnp.mean(jnp.abs(x - xrec.astype(jnp.float32)))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  x, key, opt_state = jnp.asarray(images), jax.random.key(0), tx.init(params)
  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, x, key).compile()
  compile_s = time.perf_counter() - start
  print(f"jax autoencoder-only step compiled in {compile_s:.1f} s", flush=True)
  holder = [params, opt_state]

  def run_once():
    holder[0], holder[1], loss = compiled(holder[0], holder[1], x, key)
    jax.block_until_ready(loss)

  times = time_steps(run_once, _WARMUP.value, _STEPS.value)
  return dict(times=times, compile_s=compile_s, flops=compiled_flops(compiled),
              images=images.shape[0])


def torch_autoencoder_step(config, images: np.ndarray) -> dict | None:
  """The same autoencoder-only step in PyTorch with diffusers' modules (None if missing)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import diffusers  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    print(f"torch step skipped: {e}")
    return None
  from ldm_jax.convert.autoencoder import diffusers_config  # pylint: disable=import-outside-toplevel
  spec, _ = build_programs(config)
  kwargs = diffusers_config(spec, 0.18215)
  model_cls = getattr(diffusers, kwargs.pop("_class_name"))
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count())
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = model_cls(**kwargs).to(device).train()
  opt = torch.optim.Adam(model.parameters(),
                         lr=learning_rate(config.optim,
                                          DataSpec.from_config(config.data).batch_size),
                         betas=(float(config.optim.b1), float(config.optim.b2)))
  x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
  autocast = torch.autocast(device, dtype=torch.bfloat16,
                            enabled=spec.dtype == "bfloat16")

  def run_once():
    opt.zero_grad(set_to_none=True)
    with autocast:
      if spec.kind == "kl":
        xrec = model.decode(model.encode(x).latent_dist.sample()).sample
      else:
        xrec = model(x).sample
      loss = (x - xrec.float()).abs().mean()
    loss.backward()
    opt.step()
    if device == "cuda":
      torch.cuda.synchronize()

  times = time_steps(run_once, _WARMUP.value, _STEPS.value)
  return dict(times=times, images=images.shape[0], device=device)


def summarize(result: dict | None, peak: float | None) -> dict | None:
  """Median step time, images/s, GFLOP per image and MFU of one timed step, as text."""
  if result is None:
    return None
  median = statistics.median(result["times"])
  flops = result.get("flops")
  return dict(
      mean=f"{statistics.mean(result['times']):.3f}", median=f"{median:.3f}",
      images_s=f"{result['images'] / median:.2f}",
      gflop=f"{flops / result['images'] / 1e9:.1f}" if flops else "n/a",
      mfu=f"{flops / median / (peak * 1e12):.1%}" if flops and peak else "n/a")


def row(name: str, summary: dict | None) -> str:
  if summary is None:
    return f"| {name} | skipped | | | | |"
  return (f"| {name} | {summary['mean']} | {summary['median']} | {summary['images_s']} | "
          f"{summary['gflop']} | {summary['mfu']} |")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = configure()
  device_kind = jax.devices()[0].device_kind
  data = DataSpec.from_config(config.data)
  batch, size = data.batch_size, data.image_size
  accumulate = int(config.optim.accumulate_grad_batches)
  dtype = str(config.model.dtype)
  peak = peak_tflops(device_kind, dtype)
  config_name = flags.FLAGS["config"].config_filename
  print(f"device: {device_kind} ({jax.device_count()} x {jax.devices()[0].platform}, "
        f"{os.cpu_count()} CPUs)")
  print(f"jax {jax.__version__}", end="")
  try:
    import torch  # pylint: disable=import-outside-toplevel
    print(f", torch {torch.__version__}")
  except ImportError:
    print(", torch not installed")
  print(f"config: {config_name}  batch: {batch} x accumulate {accumulate}  "
        f"resolution: {size}  dtype: {dtype}  perceptual_weight: "
        f"{config.loss.perceptual_weight}  steps: {_STEPS.value} (+{_WARMUP.value} warm-up)")
  print(f"peak: {f'{peak} TFLOP/s' if peak else 'unknown (no MFU)'}", flush=True)

  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (accumulate, batch, size, size, 3)).astype(np.float32)
  gan = None if _SKIP_GAN.value else jax_gan_step(config, images)
  ae = jax_autoencoder_step(config, images[0])
  torch_result = None if _NO_TORCH.value else torch_autoencoder_step(config, images[0])

  print("\nGFLOP/image: XLA's count for the whole compiled step (fwd + bwd + optimizer) per "
        "image; the GAN step's\nincludes the adaptive-weight vjp, the discriminator and "
        "LPIPS (when perceptual_weight > 0).")
  print("| step | mean s | median s | images/s | GFLOP/image | MFU |")
  print("|---|---|---|---|---|---|")
  gan_summary = summarize(gan, peak)
  print(row(f"jax full GAN step ({accumulate}x{batch} images)", gan_summary))
  print(row(f"jax autoencoder-only ({batch} images)", summarize(ae, peak)))
  torch_device = torch_result["device"] if torch_result else ""
  print(row(f"torch {torch_device} autoencoder-only ({batch} images)",
            summarize(torch_result, None)))
  ae_s = statistics.median(ae["times"])
  torch_s = ratio = "n/a"
  if torch_result:
    torch_median = statistics.median(torch_result["times"])
    torch_s, ratio = f"{torch_median:.3f}", f"{torch_median / ae_s:.2f}"
    print(f"torch / jax autoencoder-only step time (medians): {ratio}")

  print("\nREADME row:")
  gan_cells = (f"{gan['compile_s']:.0f} | {gan_summary['median']} | "
               f"{gan_summary['images_s']} | {gan_summary['gflop']} | {gan_summary['mfu']}"
               if gan else "skipped | | | |")
  print(f"| {datetime.date.today()} | {device_kind} | {config_name} | {size} | "
        f"{accumulate}x{batch} | {dtype} | {gan_cells} | {ae_s:.3f} | {torch_s} | {ratio} |")


if __name__ == "__main__":
  app.run(main)
