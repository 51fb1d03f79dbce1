"""Does the demo autoencoder learn to carry each image's colour, and how fast?

  python bench/colour_probe.py CH GROUPS STEPS LR SIZE   (e.g. 32 8 400 1e-3 16)

Trains the kl-f8 demo topology (width CH, GROUPS GroupNorm groups) on the built-in
training photos' center crops resized to SIZE px, each image's RGB channels in a random
order (so the colour of the output cannot come from the data's prior, only through the
latent), MSE on a posterior sample, Adam (0.9, 0.999) at LR, batch 16; every 100 steps it
prints the PSNR and mean colour error (1/255) of all 66 crops and of the held-out photos
(chelsea, rocket) alone. Not a test: it measures (see the demo notes in README "Set up").
"""
import os
import sys
import time
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import importlib.util
spec = importlib.util.spec_from_file_location(
    "kl_f8", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "kl_f8.py"))
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
from ldm_jax.models.autoencoder import AutoencoderSpec, build_autoencoder
import demo_colour as d

ch, groups, steps, lr, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
cfg = mod.get_config("demo")
cfg.model.ch = ch; cfg.model.norm_num_groups = groups; cfg.model.resolution = size
model = build_autoencoder(AutoencoderSpec.from_config(cfg.model), rngs=nnx.Rngs(0))
opt = nnx.Optimizer(model, optax.adam(lr, b1=0.9, b2=0.999), wrt=nnx.Param)
x_all, photos = d.center_crops()
x_all = np.asarray(jax.image.resize(x_all, (len(x_all), size, size, 3), 'linear'))
train = np.array([p not in ('chelsea.png', 'rocket.jpg') for p in photos])
xt = x_all[train]
rng = np.random.default_rng(0)

@nnx.jit
def step(model, opt, x, key):
  def loss(m):
    post = m.encode(x)
    z = post.mean + jnp.exp(0.5 * post.logvar) * jax.random.normal(key, post.mean.shape)
    return jnp.mean((m.decode(z) - x) ** 2)
  l, g = nnx.value_and_grad(loss)(model)
  opt.update(model, g)
  return l

t = time.time()
for i in range(steps):
  idx = rng.integers(0, len(xt), 16)
  x = xt[idx]
  # random hue: a random permutation of channels per image (colour-rich batches)
  x = np.stack([im[..., rng.permutation(3)] for im in x])
  l = step(model, opt, jnp.asarray(x), jax.random.key(i))
  if (i + 1) % 100 == 0:
    r = np.clip(np.asarray(model.decode(model.encode(x_all).mode())), -1, 1)
    ce = np.abs(r.mean((1, 2)) - x_all.mean((1, 2))).mean(1) * 127.5
    print(f"ch={ch} g={groups} step {i+1} loss {float(l):.4f} psnr {d.psnr(r, x_all).mean():.2f} "
          f"colour_err {ce.mean():.2f} val(cat,rocket) {ce[~train].mean():.2f} {time.time()-t:.0f}s", flush=True)
