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
  for key in ("total_loss", "rec_loss", "quant_loss", "disc_loss", "logits_real"):
    np.testing.assert_allclose(both[key], (first[key] + second[key]) / 2, rtol=1e-5,
                               err_msg=key)


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
