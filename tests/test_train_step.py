"""The first-stage train step: decoder-only fine-tuning, EMA, accumulation, init_from."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ldm_jax.config_lib import autoencoder_config
from ldm_jax.models.autoencoder import build_autoencoder
from ldm_jax.train import autoencoder_step as step_lib
from ldm_jax.train.autoencoder_setup import build_programs, check_config
from ldm_jax.train.optim import learning_rate


def _setup(kind="kl", **overrides):
  config = autoencoder_config(kind=kind, embed_dim=4, z_channels=4, ch_mult=(1, 2),
                              n_embed=32 if kind == "vq" else 0, batch_size=2,
                              loss=dict(disc_start=0), arg="tiny")
  for key, value in overrides.items():
    block, name = key.split("__")
    config[block][name] = value
  spec, programs = build_programs(config)
  model = build_autoencoder(spec, nnx.Rngs(0))
  disc = step_lib.build_discriminator(programs.loss, spec.dtype, 0)
  state = step_lib.new_state(model, disc, programs, bool(config.train.decoder_only), 0)
  return config, programs, state


def _images(n, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(np.clip(rng.normal(0, 0.5, (n, 2, 32, 32, 3)), -1, 1), jnp.float32)


def _flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_decoder_only_keeps_the_latent_space():
  config, programs, state = _setup(train__decoder_only=True, train__init_from="unused")
  assert all("decoder" in k or "post_quant_conv" in k for k in _flat(state.params))
  assert any("encoder" in k for k in _flat(state.frozen))
  step = jax.jit(step_lib.make_train_step(programs))
  new, _ = step(state, {"image": _images(1)}, None)
  before, after = _flat(state.frozen), _flat(new.frozen)
  for key in before:
    np.testing.assert_array_equal(before[key], after[key], err_msg=key)
  changed = [k for k, v in _flat(new.params).items() if not np.array_equal(v, _flat(
      state.params)[k])]
  assert changed


def test_decoder_only_needs_init_from():
  config = autoencoder_config(kind="kl", embed_dim=4, z_channels=4, ch_mult=(1, 2),
                              batch_size=2, loss={}, arg="tiny")
  config.train.decoder_only = True
  with pytest.raises(ValueError, match="init_from"):
    check_config(config)


def test_ema_follows_litema():
  config, programs, state = _setup(optim__ema_decay=0.999)
  step = jax.jit(step_lib.make_train_step(programs))
  new, _ = step(state, {"image": _images(1)}, None)
  decay = min(0.999, (1 + 1) / (10 + 1))  # LitEma's warm-up on the first update
  p0, p1, ema = _flat(state.params), _flat(new.params), _flat(new.ema)
  for key in p0:
    np.testing.assert_allclose(ema[key], p0[key] - (1 - decay) * (p0[key] - p1[key]),
                               rtol=1e-5, atol=1e-7, err_msg=key)
  model = step_lib.eval_model(programs, new)  # evaluation and export use the EMA
  np.testing.assert_array_equal(model.decoder.conv_out.kernel[...],
                                new.ema["decoder"]["conv_out"]["kernel"][...])


def test_accumulation_averages_micro_batches():
  _, programs, state = _setup(kind="vq")  # VQ: no posterior sampling, so deterministic
  images = _images(2)
  step = jax.jit(step_lib.make_train_step(programs))
  _, both = step(state, {"image": images}, None)
  _, first = step(state, {"image": images[:1]}, None)
  _, second = step(state, {"image": images[1:]}, None)
  for key in ("total_loss", "rec_loss", "pixel_loss", "quant_loss", "disc_loss",
              "logits_real"):
    np.testing.assert_allclose(both[key], (first[key] + second[key]) / 2, rtol=1e-5,
                               err_msg=key)


def test_scanned_accumulation_equals_unrolled():
  """GPU/TPU steps scan over micro-batches, CPU steps unroll them: the same update. Plain
  SGD, so the update is the averaged gradient itself (Adam's normalization would turn
  rounding noise in near-zero gradients, such as a conv bias before a GroupNorm, into
  updates of ~lr)."""
  import dataclasses

  import optax
  _, programs, state = _setup(kind="vq")
  programs = dataclasses.replace(programs, tx=optax.sgd(1.0), disc_tx=optax.sgd(1.0))
  state = state.replace(opt_state=programs.tx.init(state.params),
                        disc_opt_state=programs.disc_tx.init(state.disc_params))
  images = _images(3)
  results = {}
  for scan in (False, True):
    step = jax.jit(step_lib.make_train_step(
        dataclasses.replace(programs, scan_micro_batches=scan)))
    results[scan] = step(state, {"image": images}, None)
  (unrolled, m_unrolled), (scanned, m_scanned) = results[False], results[True]
  for key in ("total_loss", "disc_loss", "grad_norm"):
    np.testing.assert_allclose(m_scanned[key], m_unrolled[key], rtol=1e-5, err_msg=key)
  a, b = _flat(unrolled), _flat(scanned)
  for key in a:
    np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_step_without_the_gan_is_the_same_update_before_disc_start():
  """Before disc_start the loop runs `make_train_step(gan=False)`: no discriminator pass,
  the same update as the full step (whose GAN terms are multiplied by 0 there), fewer
  FLOPs; the discriminator's Adam still counts the step."""
  from ldm_jax.losses.autoencoder import gan_active
  _, programs, state = _setup(kind="vq", loss__disc_start=5)  # VQ: deterministic
  assert not gan_active(programs.loss, 4) and gan_active(programs.loss, 5)
  batch = {"image": _images(1)}
  steps = {gan: jax.jit(step_lib.make_train_step(programs, gan)).lower(state, batch, None)
           .compile() for gan in (True, False)}
  (full, m_full), (warm, m_warm) = steps[True](state, batch, None), steps[False](state, batch,
                                                                               None)
  for key in ("total_loss", "rec_loss", "quant_loss", "grad_norm"):
    np.testing.assert_allclose(m_warm[key], m_full[key], rtol=1e-6, err_msg=key)
  assert float(m_warm["disc_grad_norm"]) == 0.0 == float(m_full["disc_grad_norm"])
  a, b = _flat(full.replace(disc_rest=None)), _flat(warm.replace(disc_rest=None))
  assert a.keys() == b.keys()
  for key in a:  # BatchNorm's running averages (disc_rest) alone differ
    np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-7, err_msg=key)
  # The tests' discriminator is tiny (ndf 8), so the FLOPs differ little here; at the
  # demo's sizes the discriminator is about a third of the step (bench/README.md).
  flops = {gan: steps[gan].cost_analysis()["flops"] for gan in steps}
  assert flops[False] < flops[True], flops


def test_learning_rate_rule():
  optim = dict(base_learning_rate=4.5e-6, scale_lr=True, accumulate_grad_batches=2)
  assert learning_rate(optim, 12 * 8) == pytest.approx(2 * 96 * 4.5e-6)
  assert learning_rate({**optim, "scale_lr": False}, 96) == 4.5e-6


def test_actnorm_initialization_survives_the_step():
  config, programs, state = _setup(loss__use_actnorm=True)
  images = _images(1)
  assert bool(step_lib.actnorm_pending(state.disc_rest))
  key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0), 0)
  initialized = step_lib.initialize_actnorm(programs, state, images[0], key)
  assert not bool(step_lib.actnorm_pending(initialized.disc_rest))
  after, _ = jax.jit(step_lib.make_train_step(programs))(state, {"image": images}, None)
  assert not bool(step_lib.actnorm_pending(after.disc_rest))
  lr = learning_rate(config.optim, config.data.batch_size)
  init_params, trained = _flat(initialized.disc_params), _flat(after.disc_params)
  locs = [k for k in init_params if "loc" in k]
  assert locs
  for key in locs:
    # One Adam step moves a parameter by at most ~lr: the step kept the data-dependent
    # values rather than the zeros/ones it started from.
    assert np.abs(init_params[key]).max() > 10 * lr, key
    np.testing.assert_allclose(trained[key], init_params[key], atol=1.01 * lr, err_msg=key)


def test_nonfinite_update_is_dropped_and_reported():
  """A NaN batch: the whole update is dropped (both players, BatchNorm statistics, EMA),
  the step counter moves on, and the report names the values; the host guard stops or
  skips by policy."""
  from ldm_jax.train import guard
  config, programs, state = _setup(optim__ema_decay=0.9)
  step = jax.jit(step_lib.make_train_step(programs))
  images = _images(1)
  bad = images.at[0, 0, 0, 0, 0].set(jnp.nan)
  new, metrics = step(state, {"image": bad}, None)
  report = jax.device_get(metrics["guard"])
  assert int(new.step) == 1 and int(report["skipped"]) == 1 and int(report["first_step"]) == 1
  flagged = [n for b, n in enumerate(step_lib.GUARDED) if int(report["which"]) >> b & 1]
  assert "total_loss" in flagged and "grad_norm" in flagged
  before, after = _flat(state.replace(step=new.step)), _flat(new)
  for key in before:
    np.testing.assert_array_equal(before[key], after[key], err_msg=key)
  good, metrics = step(new, {"image": images}, None)
  assert int(jax.device_get(metrics["guard"])["skipped"]) == 0
  assert not np.array_equal(_flat(good.params)[next(iter(_flat(good.params)))],
                            _flat(new.params)[next(iter(_flat(new.params)))])

  # Host side: reports add up on device and are read only at check().
  skipped = {"skipped": jnp.int32(1), "which": jnp.int32(0b101), "first_step": jnp.int32(7)}
  fine = {"skipped": jnp.int32(0), "which": jnp.int32(0), "first_step": jnp.int32(2**31 - 1)}
  stop = guard.NonFiniteGuard(step_lib.GUARDED)
  stop.add(fine)
  stop.check(6, last_good=4)  # nothing to report
  stop.add(skipped)
  stop.add(fine)
  with pytest.raises(guard.NonFiniteError,
                     match=r"non-finite total_loss and grad_norm first at step 7 .*step 8.*"
                           r"newest checkpoint \(step 4\)"):
    stop.check(8, last_good=4)
  skip = guard.NonFiniteGuard(step_lib.GUARDED, "skip", limit=2)
  for _ in range(2):
    skip.add(skipped)
    skip.check(8, last_good=4)  # within the limit: logged, training goes on
  skip.add(skipped)
  with pytest.raises(guard.NonFiniteError, match="max_nonfinite=2"):
    skip.check(9, last_good=4)
  with pytest.raises(ValueError, match="on_nonfinite"):
    _setup(train__on_nonfinite="ignore")


@pytest.mark.parametrize("pixel_loss", ["l1", "mse"])
def test_rec_loss_is_the_references(pixel_loss):
  """rec_loss = mean(pixel term + perceptual_weight * LPIPS), what CompVis logs and its
  configs monitor; pixel_loss = the pixel term alone (squared for pixel_loss="mse")."""
  from ldm_jax.losses.autoencoder import LossConfig, generator_loss
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(-1, 1, (2, 4, 4, 3)), jnp.float32)
  xrec = jnp.asarray(rng.uniform(-1, 1, (2, 4, 4, 3)), jnp.float32)
  p = jnp.asarray([0.3, 0.7], jnp.float32)
  cfg = LossConfig(pixel_loss=pixel_loss, perceptual_weight=0.5)
  _, (metrics, _) = generator_loss(
      cfg, x=x, features=xrec, last_kernel=jnp.ones(()), to_image=lambda k, f: k * f,
      regularizer=jnp.asarray(0.0), discriminator=lambda im: im,
      lpips=lambda a, b: p, step=jnp.asarray(0))
  diff = np.asarray(x - xrec, np.float64)
  pixel = np.abs(diff) if pixel_loss == "l1" else diff**2
  np.testing.assert_allclose(metrics["pixel_loss"], pixel.mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics["rec_loss"], pixel.mean() + 0.5 * np.mean(p), rtol=1e-6)


def test_lpips_dropout_in_the_step_only_when_asked():
  """loss.lpips_dropout: the step's LPIPS term depends on the step key (dropout on);
  off, it is the deterministic distance of the reconstruction."""
  from ldm_jax.models.lpips import make_lpips
  lpips_model = make_lpips(None, random_init=True)
  lpips_def, lpips_state = nnx.split(lpips_model)
  images = _images(1)[0]
  values = {}
  for dropout in (False, True):
    config = autoencoder_config(kind="vq", embed_dim=4, z_channels=4, ch_mult=(1, 2),
                                n_embed=32, batch_size=2, loss={}, arg="tiny")
    config.model.num_res_blocks = 1
    config.loss.update(perceptual_weight=1.0, lpips_dropout=dropout)
    spec, programs = build_programs(config, lpips_def)
    model = build_autoencoder(spec, nnx.Rngs(0))
    disc = step_lib.build_discriminator(programs.loss, spec.dtype, 0)
    state = step_lib.new_state(model, disc, programs, False, 0)

    @jax.jit
    def p_loss(key, lpips_state):
      lpips = nnx.merge(lpips_def, lpips_state)
      loss_fn, _ = step_lib.generator_objective(programs, state, lpips, images, key,
                                                state.disc_rest)
      metrics, xrec = loss_fn(state.params)[1]
      return metrics["p_loss"], jnp.mean(lpips(images, xrec))

    values[dropout] = [p_loss(jax.random.key(k), lpips_state) for k in (0, 1)]
  (off_a, plain_a), (off_b, _) = values[False]
  (on_a, _), (on_b, _) = values[True]
  np.testing.assert_allclose(off_a, plain_a, rtol=1e-6)  # off: the plain distance
  np.testing.assert_allclose(off_a, off_b, rtol=1e-6)  # VQ: nothing else is random
  assert float(on_a) != float(on_b) and float(on_a) != float(off_a)
