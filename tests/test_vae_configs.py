"""The VAE-lineage configs: SDXL / SD3 / FLUX.1 fine-tuning recipes and the from-scratch
kl-f8c16 / kl-f16c32. Every variant is a valid run; the tiny ones build the stated latent;
an old workdir without the new keys still resumes; one tiny GAN step on SD3's topology."""

import importlib.util
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ldm_jax.models.autoencoder import AutoencoderSpec, build_autoencoder
from ldm_jax.train import resume
from ldm_jax.train.autoencoder_setup import check_config

# name -> (latent channels, quant convs, downsampling factor, level attention) as published.
FACTS = {
    "sdxl_vae": (4, True, 8, ()),
    "sd3_vae": (16, False, 8, ()),
    "flux_vae": (16, False, 8, ()),
    "kl_f8c16": (16, False, 8, ()),
    "kl_f16c32": (32, True, 16, (16,)),
}
FINETUNES = ("sdxl_vae", "sd3_vae", "flux_vae")
VARIANTS = {name: ((None, "decoder", "full", "demo", "tiny") if name in FINETUNES
                   else (None, "demo", "tiny")) for name in FACTS}
CASES = [(name, arg) for name, args in VARIANTS.items() for arg in args]


def _config(name, arg):
  spec = importlib.util.spec_from_file_location(name, f"configs/{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("name,arg", CASES)
def test_variant_is_a_valid_run(name, arg):
  channels, quant, factor, attention = FACTS[name]
  config = _config(name, arg)
  if config.train.finetunes:  # refused until the weights to fine-tune are named
    with pytest.raises(ValueError, match="init_from"):
      check_config(config)
    config.train.init_from = "/weights/vae"
  spec, _ = check_config(config)
  assert spec == AutoencoderSpec.from_config(config.model)
  assert (spec.z_channels, spec.embed_dim) == (channels, channels)
  assert spec.use_quant_conv is quant and spec.use_post_quant_conv is quant
  if arg in (None, "decoder", "full"):  # the published topology, not the shrunk one
    assert spec.downsample_factor == factor and spec.ch == 128
    assert tuple(spec.attn_resolutions) == attention
  if name in FINETUNES and arg not in ("demo", "tiny"):
    assert spec.resolution == 1024  # diffusers' sample_size for all three
    assert config.train.decoder_only is (arg != "full")
    assert config.train.finetunes
  else:
    assert not config.train.init_from and not config.train.finetunes


def test_unknown_variant_is_refused():
  with pytest.raises(ValueError, match="decoder.*full"):
    _config("sd3_vae", "encoder")


def test_full_finetune_without_weights_is_refused():
  """`:full` trains the encoder too, yet starts from the published weights: refused by
  the config check, before anything is built."""
  config = _config("flux_vae", "full")
  assert not config.train.decoder_only
  with pytest.raises(ValueError, match="fine-tunes black-forest-labs/FLUX.1-dev.*init_from"):
    check_config(config)


@pytest.mark.parametrize("name", sorted(FACTS))
def test_tiny_latent(name, images):
  channels, quant, _, _ = FACTS[name]
  config = _config(name, "tiny")
  spec, _ = check_config(config)
  model = build_autoencoder(spec, nnx.Rngs(0))
  assert (model.quant_conv is None, model.post_quant_conv is None) == (not quant, not quant)
  size = config.data.image_size
  posterior = model.encode(jnp.asarray(images[:1, :size, :size]))
  side = size // spec.downsample_factor
  assert posterior.mode().shape == (1, side, side, channels)


def test_old_workdir_without_the_new_keys_resumes():
  """A config.json written before the model's quant-conv / mid-attention keys and the
  train block's init_discriminator / finetunes: those are "added", nothing is refused."""
  config = _config("kl_f8c16", "tiny")
  config.model.update(use_quant_conv=True, use_post_quant_conv=True)  # what old runs had
  new = resume.as_json(config)
  saved = json.loads(json.dumps(new))
  for key in ("use_quant_conv", "use_post_quant_conv", "mid_block_attention"):
    del saved["model"][key]
  for key in ("init_discriminator", "finetunes"):
    del saved["train"][key]
  changes = resume.diff(saved, new)
  assert not changes["refused"] and not changes["warned"]
  assert len(changes["added"]) == 5
  # The switches only steer how a run starts: changing them on a resume is harmless.
  changed = json.loads(json.dumps(new))
  changed["train"].update(init_discriminator="fresh", finetunes="x")
  assert len(resume.diff(new, changed)["harmless"]) == 2


def test_tiny_train_step_and_export(tmp_path):
  """SD3's topology (16 channels, no quant convs) through one GAN step of the trainer's
  programs, and out as a diffusers folder that says so. (The whole command is exercised
  by test_train_autoencoder on kl-f8; a subprocess run here would double this file's time.)"""
  import jax
  from ldm_jax.convert import save_autoencoder
  from ldm_jax.train import autoencoder_step as step_lib
  from ldm_jax.train.autoencoder_setup import build_programs
  config = _config("sd3_vae", "tiny")
  config.loss.disc_start = 0  # the discriminator's step too
  spec, programs = build_programs(config)
  model = build_autoencoder(spec, nnx.Rngs(0))
  disc = step_lib.build_discriminator(programs.loss, spec.dtype, 0)
  state = step_lib.new_state(model, disc, programs, False, 0)
  size = config.data.image_size
  batch = {"image": jnp.asarray(np.random.default_rng(0).uniform(
      -1, 1, (1, config.data.batch_size, size, size, 3)), jnp.float32)}
  new, metrics = jax.jit(step_lib.make_train_step(programs))(state, batch, None)
  assert np.isfinite(float(metrics["total_loss"])) and int(new.step) == 1
  save_autoencoder(step_lib.eval_model(programs, new), tmp_path / "ae", format="diffusers")
  exported = json.loads((tmp_path / "ae" / "config.json").read_text())
  assert exported["latent_channels"] == 16
  assert exported["use_quant_conv"] is False and exported["use_post_quant_conv"] is False
