"""EQ-VAE regularization (loss.eq_vae_*): the transformed loss against a hand computation,
the per-micro-batch draw, the jitted step's switch, and the checks on bad values."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ldm_jax.config_lib import autoencoder_config
from ldm_jax.losses.autoencoder import (LossConfig, eq_vae_draw, eq_vae_sizes,
                                        eq_vae_transforms)
from ldm_jax.models.autoencoder import build_autoencoder
from ldm_jax.train import autoencoder_step as step_lib
from ldm_jax.train.autoencoder_setup import build_programs, check_config


def _config(kind="kl", **loss):
  # One level, one block: the smallest programs (these tests compile several), 32x32
  # images and 32x32 latents.
  config = autoencoder_config(kind=kind, embed_dim=4, z_channels=4, ch_mult=(1,),
                              n_embed=32 if kind == "vq" else 0, batch_size=2, loss={},
                              arg="tiny")
  config.model.num_res_blocks = 1
  config.loss.update(kl_weight=1e-2, **loss)
  return config


def _setup(kind="kl", **loss):
  spec, programs = build_programs(_config(kind, **loss))
  model = build_autoencoder(spec, nnx.Rngs(0))
  disc = step_lib.build_discriminator(programs.loss, spec.dtype, 0)
  return programs, model, disc, step_lib.new_state(model, disc, programs, False, 0)


def _images(n=2, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(np.clip(rng.normal(0, 0.5, (n, 32, 32, 3)), -1, 1), jnp.float32)


def _np_downscale(a, scale):
  """Bilinear, half-pixel centers, no antialias (torch F.interpolate(mode="bilinear",
  align_corners=False)), written out on NHWC numpy arrays."""
  def axis(a, ax):
    n = a.shape[ax]
    out = round(n * scale)
    src = np.maximum((np.arange(out) + 0.5) / scale - 0.5, 0.0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    w = (src - i0).reshape([-1 if d == ax else 1 for d in range(a.ndim)])
    return np.take(a, i0, axis=ax) * (1 - w) + np.take(a, i1, axis=ax) * w
  return axis(axis(np.asarray(a, np.float64), 1), 2)


def _np_tau(a, scale, turns):
  return np.rot90(_np_downscale(a, scale), turns, axes=(1, 2))


@pytest.mark.parametrize("kind,scale,turns", [("kl", 0.5, 1), ("vq", 0.75, 3)])
def test_transformed_loss_matches_hand_computation(kind, scale, turns):
  """decode(tau(z)) against tau(x): pixel term, GAN term on the transformed pair, and the
  regularizer of the untransformed latent, recomputed here from the model's pieces."""
  programs, model, disc, state = _setup(kind, disc_start=1)
  x, key = _images(), jax.random.key(3)
  objective = nnx.jit(lambda p: step_lib.generator_objective(
      programs, state, None, x, key, state.disc_rest, (scale, turns))[0](p))
  loss, (metrics, xrec) = objective(state.params)

  # Hand computation: the model's encoder and decoder, everything between them in numpy.
  if kind == "kl":
    posterior = nnx.jit(lambda m, x: m.encode(x))(model, x)
    z = np.asarray(posterior.sample(key))
    regularizer = float(np.sum(np.asarray(posterior.kl()))) / x.shape[0]
  else:
    quantized = nnx.jit(lambda m, x: m.quantize(m.encode(x), key))(model, x)
    z, regularizer = np.asarray(quantized.z_q), float(np.mean(quantized.loss))
  z_t = jnp.asarray(_np_tau(z, scale, turns), jnp.float32)
  expected_rec = np.asarray(nnx.jit(
      lambda m, z: m.decoder(m.post_quant(z)))(model, z_t), np.float64)
  target = _np_tau(np.asarray(x), scale, turns)
  side = round(32 * scale)
  assert xrec.shape == target.shape == (2, side, side, 3)
  np.testing.assert_allclose(xrec, expected_rec, rtol=1e-4, atol=1e-5)
  pixel = np.abs(target - expected_rec)
  logits = np.asarray(nnx.jit(lambda d, im: d(im, train=True))(disc, jnp.asarray(
      expected_rec, jnp.float32)))
  np.testing.assert_allclose(metrics["g_loss"], -logits.mean(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(metrics["pixel_loss"], pixel.mean(), rtol=1e-4)
  assert float(metrics["disc_factor"]) == 0.0  # step 0 < disc_start: no GAN term in total
  if kind == "kl":  # logvar 0: nll = sum over C, H, W of the transformed pair, mean over B
    nll = pixel.sum() / x.shape[0]
    np.testing.assert_allclose(metrics["kl_loss"], regularizer, rtol=1e-5)
    expected = nll + 1e-2 * regularizer
  else:
    nll = pixel.mean()
    np.testing.assert_allclose(metrics["quant_loss"], regularizer, rtol=1e-5)
    expected = nll + 1.0 * regularizer
  np.testing.assert_allclose(metrics["nll_loss"], nll, rtol=1e-4)
  np.testing.assert_allclose(loss, expected, rtol=1e-4)


def test_off_by_default_is_the_old_loss():
  """Defaults (config file and LossConfig) are off; the untransformed branch of the
  switch, scale 1 and no turn, is the plain loss bit for bit."""
  config = _config()
  assert config.loss.eq_vae_prob == 0.0 and LossConfig().eq_vae_prob == 0.0
  for name in ("eq_vae_scales", "eq_vae_rotations", "lpips_dropout"):
    assert tuple(np.atleast_1d(config.loss[name])) == tuple(
        np.atleast_1d(getattr(LossConfig(), name))), name
  programs, _, _, state = _setup()
  x, key = _images(seed=1), jax.random.key(0)
  run = jax.jit(lambda s, t: step_lib.generator_objective(
      programs, s, None, x, key, s.disc_rest, t)[0](s.params), static_argnums=1)
  plain, identity = run(state, None), run(state, (1.0, 0))
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(identity)):
    np.testing.assert_array_equal(a, b)


def test_draws_follow_the_probability_and_cover_the_transforms():
  cfg = LossConfig(eq_vae_prob=0.5, eq_vae_scales=(0.5, 0.75))
  transforms = eq_vae_transforms(cfg)
  assert transforms == ((0.5, 1), (0.5, 2), (0.5, 3), (0.75, 1), (0.75, 2), (0.75, 3))
  assert eq_vae_sizes(cfg) == (1.0, 0.5, 0.75)
  keys = jax.random.split(jax.random.key(0), 4000)
  size, turns, applied = jax.jit(jax.vmap(lambda k: eq_vae_draw(cfg, k)))(keys)
  size, turns, applied = map(np.asarray, (size, turns, applied))
  assert abs(applied.mean() - 0.5) < 0.03
  assert np.all(size[~applied] == 0) and np.all(turns[~applied] == 0)
  drawn = {(eq_vae_sizes(cfg)[s], int(t)) for s, t in zip(size[applied], turns[applied])}
  assert drawn == set(transforms)
  # Rotation only, and scaling only.
  assert eq_vae_transforms(dataclasses.replace(cfg, eq_vae_scales=())) == (
      (1.0, 1), (1.0, 2), (1.0, 3))
  assert eq_vae_transforms(dataclasses.replace(cfg, eq_vae_rotations=False)) == (
      (0.5, 0), (0.75, 0))


def test_step_switches_to_the_drawn_transform():
  """The jitted step: a draw from the micro-batch's key picks the branch; its loss is the
  objective at that transform, and the metrics say what was applied."""
  programs, _, _, state = _setup(eq_vae_prob=1.0, eq_vae_scales=(0.5,))
  images = _images()[None]
  steps = {switch: jax.jit(step_lib.make_train_step(dataclasses.replace(
      programs, eq_vae_switch=switch)))(state, {"image": images}, None)
           for switch in (True, False)}  # GPU/TPU switch; CPU computes all and selects
  for key in ("total_loss", "disc_loss", "grad_norm", "disc_grad_norm"):
    np.testing.assert_allclose(steps[False][1][key], steps[True][1][key], rtol=1e-5)
  new, metrics = steps[True]
  key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0), 0)
  size, turns, applied = eq_vae_draw(programs.loss,
                                     jax.random.fold_in(key, step_lib.EQ_VAE_SALT))
  assert bool(applied) and int(size) == 1 and 1 <= int(turns) <= 3
  assert float(metrics["eq_vae_applied"]) == 1.0 and float(metrics["eq_vae_scale"]) == 0.5
  loss, _ = jax.jit(lambda p: step_lib.generator_objective(
      programs, state, None, images[0], key, state.disc_rest, (0.5, int(turns)))[0](p))(
          state.params)
  np.testing.assert_allclose(metrics["total_loss"], loss, rtol=1e-5)
  assert int(jax.device_get(metrics["guard"])["skipped"]) == 0 and int(new.step) == 1


@pytest.mark.parametrize("loss,message", [
    (dict(eq_vae_prob=1.5), r"eq_vae_prob=1.5 must be in \[0, 1\]"),
    (dict(eq_vae_prob=-0.1), r"must be in \[0, 1\]"),
    (dict(eq_vae_prob=0.5, eq_vae_scales=(0.0, 0.5)), r"every scale must be in \(0, 1\]"),
    (dict(eq_vae_prob=0.5, eq_vae_scales=(1.5,)), r"every scale must be in \(0, 1\]"),
    (dict(eq_vae_prob=0.5, eq_vae_scales=("half",)), "must be a tuple of numbers"),
    (dict(eq_vae_prob=0.5, eq_vae_scales=(1.0,), eq_vae_rotations=False),
     "no transform to apply"),
    # 32x32 latents: 32 * 0.3 = 9.6.
    (dict(eq_vae_prob=0.5, eq_vae_scales=(0.3,)), "9.6, not an integer size"),
    # 8x8 images leave the tiny config's 2-layer PatchGAN an empty map.
    (dict(eq_vae_prob=0.5, eq_vae_scales=(0.25,)), "too small for the 2-layer discriminator"),
    (dict(eq_vae_prob=0.5, eq_vae_scales=(0.25,), disc_num_layers=1, perceptual_weight=1.0),
     "LPIPS needs at least 16x16"),
])
def test_bad_values_are_refused_before_compiling(loss, message):
  with pytest.raises(ValueError, match=message):
    check_config(_config(**loss))


def test_scales_are_only_checked_when_on():
  check_config(_config(eq_vae_scales=(0.3,)))  # off: the scales are never used
  spec, cfg = check_config(_config(eq_vae_prob=0.5, eq_vae_scales=[0.5, 0.75]))
  assert cfg.eq_vae_scales == (0.5, 0.75)  # a list from the command line becomes a tuple
