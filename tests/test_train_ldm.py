"""LDM training end to end on tiny models: samples, resume keeps scale_by_std, guidance."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import KL_F8_SMALL, VQ_F4_SMALL
from ldm_jax.convert import save_autoencoder
from ldm_jax.models.autoencoder import build_autoencoder
from ldm_jax.train import checkpoint, ldm_trainer
from ldm_jax.train.ldm_setup import abstract_state, build_programs
from ldm_jax.train.ldm_trainer import build_run, make_sampler


def _config(name, first_stage, **train):
  spec = importlib.util.spec_from_file_location(name, f"configs/{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.first_stage.path = str(first_stage)
  config.train.update(train)
  return config


@pytest.fixture(scope="module")
def kl_weights(tmp_path_factory):
  path = tmp_path_factory.mktemp("ae") / "kl.safetensors"
  save_autoencoder(build_autoencoder(KL_F8_SMALL, nnx.Rngs(0)), path, format="compvis")
  return path


def _saved_state(workdir):
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  run = build_run(config, str(workdir))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        abstract_state(config, run.spec, run.programs))
  return checkpoint.restore_state_only(str(workdir), target)


def test_text_ldm_trains_samples_and_resumes_with_the_same_scale(tmp_path, kl_weights):
  config = _config("ldm_txt2img", kl_weights, num_steps=4)
  metrics = ldm_trainer.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(metrics["train/loss"])
  assert sorted(os.listdir(tmp_path / "images")) == ["samples_0000002.png",
                                                      "samples_0000004.png"]
  state, step = _saved_state(tmp_path)
  assert step == 4
  scale = float(state.scale_factor)
  assert scale > 0 and scale != 1.0  # set by scale_by_std from the first batch

  resumed = _config("ldm_txt2img", kl_weights, num_steps=6)
  ldm_trainer.train_and_evaluate(resumed, str(tmp_path))
  state, step = _saved_state(tmp_path)
  assert step == 6 and float(state.scale_factor) == scale  # kept, not recomputed

  # The sampling command on the finished run.
  import subprocess
  import sys
  out = tmp_path / "grid.png"
  command = [sys.executable, "-m", "ldm_jax.sample", f"--workdir={tmp_path}", "--num=3",
             "--batch=3", "--steps=3", "--sampler=plms", "--guidance=2", "--prompt=a cat",
             f"--out={out}"]
  proc = subprocess.run(command, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  from PIL import Image
  assert Image.open(out).size == (4 * 32, 32)  # one row of a 4-wide grid
  from ldm_jax.convert import load_autoencoder
  from ldm_jax.convert.unet import load_unet
  from ldm_jax.train.export import export_ldm_workdir
  assert export_ldm_workdir(str(tmp_path), str(tmp_path / "ldm.safetensors"), "compvis") == 6
  unet = load_unet(tmp_path / "ldm.safetensors", spec=dict(config.unet))
  load_autoencoder(tmp_path / "ldm.safetensors")  # first_stage_model.* of the same file
  export_ldm_workdir(str(tmp_path), str(tmp_path / "ldm_diffusers"), "diffusers")
  from diffusers import AutoencoderKL, UNet2DConditionModel
  UNet2DConditionModel.from_pretrained(tmp_path / "ldm_diffusers" / "unet")
  vae = AutoencoderKL.from_pretrained(tmp_path / "ldm_diffusers" / "vae")
  assert abs(vae.config.scaling_factor - scale) < 1e-6
  assert (tmp_path / "ldm_diffusers" / "cond" / "model.safetensors").exists()
  del unet
  bad = subprocess.run(command[:-3] + ["--class_id=2"], env=dict(os.environ, JAX_PLATFORMS="cpu"),
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "--prompt" in bad.stderr


def test_guidance_changes_class_conditional_samples(tmp_path):
  weights = tmp_path / "vq.safetensors"
  save_autoencoder(build_autoencoder(VQ_F4_SMALL, nnx.Rngs(0)), weights, format="compvis")
  config = _config("ldm_cin256", weights)
  run = build_run(config, str(tmp_path))
  from ldm_jax.train import ldm_step
  from ldm_jax.train.ldm_setup import build_model
  model = build_model(config, run.spec, 0)
  # A fresh UNet predicts exactly zero (zero-initialized outputs, as in CompVis); perturbed
  # weights give a model whose conditional and unconditional outputs differ.
  params = nnx.state(model.unet, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
  nnx.update(model.unet, jax.tree.map(
      lambda p: p + 0.05 * jax.random.normal(next(keys), p.shape), params))
  state = ldm_step.new_state(model, run.programs, 1.0, 0)
  labels = {"label": jnp.array([0, 1])}
  key = jax.random.key(0)
  samples = {}
  for scale in (1.0, 3.0):
    config.sample.guidance_scale = scale
    samples[scale] = np.asarray(make_sampler(run)(state, labels, run.first_stage_state, key,
                                                  num=2))
  assert samples[1.0].shape == (2, 32, 32, 3)
  assert np.abs(samples[1.0] - samples[3.0]).max() > 1e-3


def test_bad_ldm_configs(tmp_path, kl_weights):
  config = _config("ldm_txt2img", kl_weights)
  config.unet.context_dim = 48
  with pytest.raises(ValueError, match="context_dim"):
    build_programs(config, None)
  config = _config("ldm_txt2img", kl_weights)
  config.sample.sampler = "euler"
  with pytest.raises(ValueError, match="sample.sampler"):
    build_programs(config, None)
  config = _config("ldm_cin256", kl_weights)  # a KL-f8 file for a VQ-f4 config
  with pytest.raises(ValueError, match="first_stage"):
    build_run(config, str(tmp_path))
  config = _config("ldm_txt2img", kl_weights)
  config.first_stage.path = ""
  with pytest.raises(ValueError, match="first_stage.path"):
    build_run(config, str(tmp_path))
