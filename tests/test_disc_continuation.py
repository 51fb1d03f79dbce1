"""`train.init_from` a CompVis training checkpoint: the run continues its PatchGAN
(`loss.discriminator.*`, BatchNorm statistics or ActNorm state included) unless
`train.init_discriminator="fresh"`; a discriminator of another shape is refused with the
values to change; a `loss.logvar` other than the config's logvar_init is warned about."""

import logging

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from ldm_jax.config_lib import autoencoder_config
from ldm_jax.convert.files import WeightFileError
from ldm_jax.convert.torch_layout import export_state
from ldm_jax.losses.autoencoder import LossConfig
from ldm_jax.models.autoencoder import AutoencoderSpec, build_autoencoder
from ldm_jax.train import autoencoder_step as step_lib
from ldm_jax.train.autoencoder_trainer import build_run, initial_state


def _config(init_from="", **loss):
  config = autoencoder_config(kind="kl", embed_dim=4, z_channels=4, ch_mult=(1, 2),
                              batch_size=2, loss={}, arg="tiny")
  config.loss.update(loss)  # after "tiny", which sets its own disc_ndf / disc_num_layers
  config.train.init_from = str(init_from)
  return config


def _compvis_checkpoint(path, config, logvar=0.0):
  """A Lightning checkpoint as CompVis' main.py writes it: the autoencoder's keys bare, the
  loss's under `loss.` (its discriminator after some training: BatchNorm statistics moved,
  or ActNorm initialized), nested in `state_dict`. Returns the discriminator's tensors."""
  spec = AutoencoderSpec.from_config(config.model)
  loss = LossConfig.from_config(config.loss)
  disc = step_lib.build_discriminator(loss, spec.dtype, seed=1234)  # not the run's seed
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  disc(x, train=True), disc(0.5 * x, train=True)  # updates the norms' state
  disc_tensors = export_state(disc)
  state = {k: torch.from_numpy(np.array(v))
           for k, v in export_state(build_autoencoder(spec, nnx.Rngs(7))).items()}
  state.update({f"loss.discriminator.{k}": torch.from_numpy(np.array(v))
                for k, v in disc_tensors.items()})
  state["loss.logvar"] = torch.tensor(logvar)
  torch.save({"state_dict": state, "global_step": 1000}, path)
  return disc_tensors


def _run_disc(run, state):
  disc = nnx.merge(run.programs.disc_def, state.disc_params, state.disc_rest)
  return export_state(disc)


def _assert_equal(ours, theirs):
  assert ours.keys() == theirs.keys()
  for key in ours:
    np.testing.assert_array_equal(np.asarray(ours[key]), np.asarray(theirs[key]), err_msg=key)


@pytest.mark.parametrize("use_actnorm", [False, True])
def test_continues_the_checkpoint_discriminator(tmp_path, use_actnorm, caplog):
  path = tmp_path / "last.ckpt"
  config = _config(path, use_actnorm=use_actnorm)
  file_disc = _compvis_checkpoint(path, config)
  if not use_actnorm:  # BatchNorm: weights, biases and the running statistics
    assert {"main.3.running_mean", "main.3.running_var", "main.3.num_batches_tracked"} <= \
        set(file_disc)
    assert int(file_disc["main.3.num_batches_tracked"]) == 2
  else:
    assert int(file_disc["main.3.initialized"]) == 1
  run = build_run(config, str(tmp_path / "run"))
  with caplog.at_level(logging.INFO):
    state = initial_state(run)
  _assert_equal(_run_disc(run, state), file_disc)
  assert "discriminator: continued from" in caplog.text
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # logvar 0 == 0

  config.train.init_discriminator = "fresh"
  run = build_run(config, str(tmp_path / "run"))
  with caplog.at_level(logging.INFO):
    fresh = _run_disc(run, initial_state(run))
  seed_init = export_state(step_lib.build_discriminator(run.loss, run.spec.dtype,
                                                        int(config.train.seed)))
  _assert_equal(fresh, seed_init)
  assert not np.array_equal(fresh["main.0.weight"], file_disc["main.0.weight"])
  assert "init_discriminator=fresh" in caplog.text


def test_discriminator_of_another_shape_is_refused(tmp_path):
  path = tmp_path / "last.ckpt"
  _compvis_checkpoint(path, _config(path))  # the tiny disc: disc_ndf=8, disc_num_layers=2
  run = build_run(_config(path, disc_ndf=16), str(tmp_path / "run"))
  with pytest.raises(WeightFileError) as err:
    initial_state(run)
  message = str(err.value)
  assert "loss.disc_ndf=8" in message and "loss.disc_num_layers=2" in message  # the file's
  assert "this config has loss.disc_ndf=16" in message
  assert "init_discriminator=fresh" in message
  # The switch gets past it.
  config = _config(path, disc_ndf=16)
  config.train.init_discriminator = "fresh"
  initial_state(build_run(config, str(tmp_path / "run")))


def test_logvar_other_than_the_config_is_warned(tmp_path, caplog):
  path = tmp_path / "last.ckpt"
  config = _config(path)
  _compvis_checkpoint(path, config, logvar=0.5)
  with caplog.at_level(logging.WARNING):
    initial_state(build_run(config, str(tmp_path / "run")))
  warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
  assert "loss.logvar=0.5" in warning and "loss.logvar_init=0" in warning
  assert config.loss.logvar_init == 0.0  # the config is left as it is


def test_unknown_switch_value_is_refused(tmp_path):
  config = _config()
  config.train.init_discriminator = "load"
  with pytest.raises(ValueError, match="init_discriminator='load'.*auto.*fresh"):
    initial_state(build_run(config, str(tmp_path / "run")))
