"""EQ-VAE fine-tuning against plain fine-tuning: `python bench/eq_vae.py`.

A short run on the built-in photos (`ldm_jax.data.builtin`): one autoencoder is trained
for `--pretrain_steps` with the plain loss, then fine-tuned twice from that same state for
`--finetune_steps`, once plain and once with EQ-VAE (`loss.eq_vae_prob`), same data order,
same keys. Both (and the start) are then measured on the held-out tiles:

- latent equivariance error: mean over images and transforms tau (every scale of
  `--scales` with every quarter turn 1..3, the transforms EQ-VAE trains on) of the
  per-pixel squared error |decode(tau(z)) - tau(x)|^2, z the posterior mean of x (the
  measure of the paper's Fig. 1/2 in the form of an MSE; also as PSNR);
- the plain reconstruction error, tau = identity, to see what the regularizer costs.

Not a test: it checks nothing, it measures. See bench/README.md.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from ldm_jax.convert import load_autoencoder
from ldm_jax.data import builtin
from ldm_jax.data.spec import DataSpec
from ldm_jax.losses.autoencoder import eq_vae_transform
from ldm_jax.models.autoencoder import build_autoencoder
from ldm_jax.train import autoencoder_step as step_lib
from ldm_jax.train.autoencoder_setup import build_programs

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/kl_f8.py:demo", "A KL or VQ config; fields can be overridden.")
_PRETRAIN = flags.DEFINE_integer("pretrain_steps", 150, "Plain steps before the split.")
_FINETUNE = flags.DEFINE_integer("finetune_steps", 100, "Steps of each fine-tune.")
_PROB = flags.DEFINE_float("eq_vae_prob", 0.5, "loss.eq_vae_prob of the EQ-VAE run "
                           "(0.5: the paper config's p_prior).")
_SCALES = flags.DEFINE_list("scales", ["0.5", "0.75"], "loss.eq_vae_scales of the EQ-VAE "
                            "run, also the scales measured.")
_SEED = flags.DEFINE_integer("seed", 0, "Model init, data order and step keys.")
_INIT_FROM = flags.DEFINE_string(
    "init_from", "", "Start from these autoencoder weights (a finished run's "
    "export/autoencoder, any path train.init_from takes) instead of the seed's init; "
    "--pretrain_steps then continues it (0: fine-tune it as it is).")


def to_images(tiles: np.ndarray) -> np.ndarray:
  return tiles.astype(np.float32) / 127.5 - 1.0


def train_batches(size: int, batch: int, seed: int):
  """Random `size` crops of the training tiles, random horizontal flips, forever."""
  tiles = np.stack(builtin.load_tiles("train"))
  rng = np.random.default_rng(seed)
  while True:
    idx = rng.integers(0, len(tiles), batch)
    top, left = rng.integers(0, tiles.shape[1] - size + 1, (2, batch))
    crops = np.stack([tiles[i, t:t + size, l:l + size] for i, t, l in zip(idx, top, left)])
    flip = rng.random(batch) < 0.5
    crops[flip] = crops[flip, :, ::-1]
    yield to_images(crops)


def validation_images(size: int) -> np.ndarray:
  """The held-out tiles, area-downscaled to `size` (whole tiles, no crop)."""
  tiles = np.stack(builtin.load_tiles("validation")).astype(np.float32)
  f = tiles.shape[1] // size
  tiles = tiles.reshape(len(tiles), size, f, size, f, 3).mean(axis=(2, 4))
  return tiles / 127.5 - 1.0


def measure(programs, state, images, scales) -> dict:
  """Per-pixel MSE of decode(tau(z)) against tau(x), by transform, z the posterior mean."""
  model = step_lib.eval_model(programs, state, use_ema=False)

  @nnx.jit(static_argnums=(2, 3))
  def error(model, x, scale, turns):
    if model.spec.kind == "kl":
      z = model.encode(x).mode()
    else:
      z = model.quantize(model.encode(x)).z_q
    xrec = model.decoder(model.post_quant(eq_vae_transform(z, scale, turns)))
    return jnp.mean(jnp.square(xrec - eq_vae_transform(x, scale, turns)))

  x = jnp.asarray(images)
  out = {"identity": float(error(model, x, 1.0, 0))}
  for s in scales:
    for k in (1, 2, 3):
      out[f"s{s:g}/r{90 * k}"] = float(error(model, x, s, k))
  out["equivariance"] = float(np.mean([v for k, v in out.items() if k != "identity"]))
  return out


def psnr(mse: float) -> float:
  return 10 * np.log10(4.0 / mse)  # images in [-1, 1]: peak-to-peak 2


def main(_):
  config = _CONFIG.value
  config.optim.ema_decay = 0.0  # compare the trained weights themselves
  scales = tuple(float(s) for s in _SCALES.value)
  data = DataSpec.from_config(config.data)
  size, batch = data.image_size, data.batch_size
  accumulate = int(config.optim.accumulate_grad_batches)
  spec, programs = build_programs(config)
  eq_config = config.copy_and_resolve_references()
  eq_config.loss.update(eq_vae_prob=_PROB.value, eq_vae_scales=scales)
  _, eq_programs = build_programs(eq_config)  # runs the checks on the scales too
  if config.loss.perceptual_weight > 0:
    raise app.UsageError("this bench runs without LPIPS (no VGG weights offline): use a "
                         "config with loss.perceptual_weight=0, e.g. a :demo one")
  model = (load_autoencoder(_INIT_FROM.value, spec) if _INIT_FROM.value
           else build_autoencoder(spec, nnx.Rngs(_SEED.value)))
  disc = step_lib.build_discriminator(programs.loss, spec.dtype, _SEED.value)
  start = step_lib.new_state(model, disc, programs, False, _SEED.value)
  val = validation_images(size)
  print(f"config {config.model.kind} f{spec.downsample_factor}, {size}x{size}, batch "
        f"{accumulate}x{batch}, {len(val)} held-out tiles; pretrain {_PRETRAIN.value} steps, "
        f"fine-tune {_FINETUNE.value}; EQ-VAE p={_PROB.value} scales={scales} rotations")

  compiled = {}  # one jitted step per programs: the plain fine-tune reuses the pretrain's

  def train(programs, state, steps, seed, name):
    if id(programs) not in compiled:
      compiled[id(programs)] = jax.jit(step_lib.make_train_step(programs))
    step = compiled[id(programs)]
    data = train_batches(size, accumulate * batch, seed)
    t0 = time.perf_counter()
    for i in range(steps):
      images = next(data).reshape(accumulate, batch, size, size, 3)
      state, metrics = step(state, {"image": jnp.asarray(images)}, None)
      if i == 0:
        jax.block_until_ready(state)
        t1 = time.perf_counter()
    jax.block_until_ready(state)
    t2 = time.perf_counter()
    applied = f", EQ applied {float(metrics['eq_vae_applied']):.0f} on the last" if (
        "eq_vae_applied" in metrics) else ""
    print(f"{name}: {steps} steps, first (compile) {t1 - t0:.0f} s, then "
          f"{(t2 - t1) / max(steps - 1, 1):.2f} s/step; last rec_loss "
          f"{float(metrics['rec_loss']):.4f}{applied}")
    return state

  results = {f"start ({_INIT_FROM.value or 'random init'})":
             measure(programs, start, val, scales)}
  base = start
  if _PRETRAIN.value:
    base = train(programs, start, _PRETRAIN.value, _SEED.value, "pretrain")
    results[f"pretrained (+{_PRETRAIN.value})"] = measure(programs, base, val, scales)
  # Same data order (seed) and step keys (state.rng, state.step) in both fine-tunes.
  plain = train(programs, base, _FINETUNE.value, _SEED.value + 1, "fine-tune plain")
  results[f"fine-tuned plain (+{_FINETUNE.value})"] = measure(programs, plain, val, scales)
  eq = train(eq_programs, base, _FINETUNE.value, _SEED.value + 1, "fine-tune EQ-VAE")
  results[f"fine-tuned EQ-VAE (+{_FINETUNE.value})"] = measure(programs, eq, val, scales)

  first = next(iter(results.values()))
  keys = ["identity"] + [k for k in first if "/" in k] + ["equivariance"]
  print("\nper-pixel MSE on held-out tiles, decode(tau(z)) vs tau(x) (images in [-1, 1])")
  print("| model | " + " | ".join(keys) + " | PSNR id | PSNR equiv |")
  print("|---" * (len(keys) + 3) + "|")
  for name, r in results.items():
    print(f"| {name} | " + " | ".join(f"{r[k]:.4f}" for k in keys) +
          f" | {psnr(r['identity']):.2f} | {psnr(r['equivariance']):.2f} |")


if __name__ == "__main__":
  app.run(main)
