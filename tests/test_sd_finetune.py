"""Stable Diffusion fine-tuning (configs/sd_finetune.py) on a tiny random diffusers
pipeline: trains the UNet with the VAE and CLIP text encoder frozen, resumes, exports a
pipeline diffusers loads and samples, and a latent-cached run (text contexts cached too)
equals the run from images."""

import importlib.util
import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from ldm_jax.train import checkpoint, ldm_trainer
from ldm_jax.train.ldm_setup import abstract_state
from ldm_jax.train.ldm_trainer import build_run
from sd_fixtures import PROMPTS, build_diffusers_pipeline


def _config(pipeline, **train):
  spec = importlib.util.spec_from_file_location("sd_finetune", "configs/sd_finetune.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.pipeline.path = os.path.relpath(pipeline)  # stored absolute by the run
  config.train.update(train)
  return config


def _saved_state(workdir, step=None):
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  run = build_run(config, str(workdir), check_training_data=False)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        abstract_state(config, run.spec, run.programs))
  return run, *checkpoint.restore_state_only(str(workdir), target, step)


def _flat(module_or_state):
  state = (module_or_state if isinstance(module_or_state, nnx.State)
           else nnx.state(module_or_state))
  return {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(state)}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
  return build_diffusers_pipeline(tmp_path_factory.mktemp("sd"))[1]


@pytest.fixture(scope="module")
def trained(pipeline, tmp_path_factory):
  """A 2-step fine-tune from images: (workdir, its metrics)."""
  workdir = tmp_path_factory.mktemp("sd_ft")
  return workdir, ldm_trainer.train_and_evaluate(_config(pipeline), str(workdir))


def test_finetune_trains_resumes_and_exports_a_diffusers_pipeline(pipeline, trained):
  from ldm_jax.convert import load_pipeline
  workdir, metrics = trained
  assert np.isfinite(metrics["train/loss"])
  source = load_pipeline(pipeline)
  run, state, step = _saved_state(workdir)
  assert step == 2
  model = ldm_trainer.ldm_step.eval_model(run.programs, state, use_ema=False)
  unet, start = _flat(model.unet), _flat(source.unet)
  assert max(np.abs(unet[k] - start[k]).max() for k in unet) > 1e-4  # the UNet trained
  # The frozen parts: the text encoder (in the checkpoint, never optimized) and the VAE.
  text, text0 = _flat(model.cond.encoder), _flat(source.text_encoder)
  assert all(np.array_equal(text[k], text0[k]) for k in text0)
  assert not jax.tree.leaves(nnx.state(model.cond.encoder, nnx.Param))  # not trained
  vae, vae0 = _flat(run.first_stage), _flat(source.vae)
  assert all(np.array_equal(vae[k], vae0[k]) for k in vae0)
  assert float(state.scale_factor) == pytest.approx(0.18215)  # the pipeline's VAE's

  # A second run to 3 steps resumes from step 2.
  metrics = ldm_trainer.train_and_evaluate(_config(pipeline, num_steps=3), str(workdir))
  assert np.isfinite(metrics["train/loss"])
  assert _saved_state(workdir)[2] == 3

  # The end-of-run export is a pipeline diffusers loads and samples from.
  import torch
  from diffusers import StableDiffusionPipeline
  out = os.path.join(workdir, "export", "pipeline")
  pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
  pipe.set_progress_bar_config(disable=True)
  images = pipe(PROMPTS[0], num_inference_steps=2, height=16, width=16, output_type="np",
                generator=torch.Generator().manual_seed(0)).images
  assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()
  # Its UNet is the run's (EMA) UNet at step 3; the text encoder the pipeline's.
  exported = load_pipeline(out)
  assert exported.scheduler == source.scheduler
  # `ldm_jax.export` writes the same pipeline from the checkpoint.
  from ldm_jax.train.export import export_ldm_workdir
  again = os.path.join(workdir, "again")
  assert export_ldm_workdir(str(workdir), again) == 3
  a, b = _flat(load_pipeline(again).unet), _flat(exported.unet)
  assert all(np.array_equal(a[k], b[k]) for k in b)


def test_cached_run_equals_the_run_from_images(pipeline, trained, tmp_path):
  """The cache holds latents' moments and the frozen encoder's contexts; training on it
  never runs the text encoder and gives the image run's numbers for the same seed."""
  import subprocess
  import sys

  from conftest import cpu_env
  from ldm_jax.data.latents import read_all
  workdir, metrics = trained
  cache = tmp_path / "cache"
  subprocess.run([sys.executable, "-m", "ldm_jax.cache_latents",
                  "--config=configs/sd_finetune.py:tiny", f"--config.pipeline.path={pipeline}",
                  f"--out={cache}", "--splits=train"], check=True, env=cpu_env())
  record = next(read_all(str(cache), "train"))
  assert record["context"].shape == (77, 32) and record["tokens"].shape == (77,)
  config = _config(pipeline)
  config.first_stage.cache_dir = str(cache)
  cached = ldm_trainer.train_and_evaluate(config, str(tmp_path / "run"))
  # Tolerance: the contexts are computed in other batch shapes (float32 rounding only);
  # Adam turns gradient rounding into weight differences of a small fraction of its step
  # (lr 1e-3 here), so weights agree to 1e-4 after 2 steps.
  assert cached["train/loss"] == pytest.approx(metrics["train/loss"], rel=1e-4, abs=1e-5)
  state = _saved_state(tmp_path / "run")[1]
  reference = _saved_state(workdir, step=2)[1]  # the other test may have resumed it to 3
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(reference.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-4)


def test_text_encoder_trains_when_asked_and_is_exported(pipeline, tmp_path):
  """cond.train_text_encoder=True: the text encoder's weights are optimized with the UNet
  and the exported pipeline carries the trained ones."""
  from ldm_jax.convert import load_pipeline
  workdir = tmp_path / "run"
  config = _config(pipeline, num_steps=1)
  config.cond.train_text_encoder = True
  metrics = ldm_trainer.train_and_evaluate(config, str(workdir))
  assert np.isfinite(metrics["train/loss"])
  run, state, step = _saved_state(workdir)
  model = ldm_trainer.ldm_step.eval_model(run.programs, state, use_ema=False)
  assert jax.tree.leaves(nnx.state(model.cond.encoder, nnx.Param))  # optimized now
  text, text0 = _flat(model.cond.encoder), _flat(load_pipeline(pipeline).text_encoder)
  assert max(np.abs(text[k] - text0[k]).max() for k in text0) > 1e-4
  exported = _flat(load_pipeline(os.path.join(workdir, "export", "pipeline")).text_encoder)
  ema = _flat(ldm_trainer.ldm_step.eval_model(run.programs, state).cond.encoder)
  assert all(np.array_equal(exported[k], ema[k]) for k in ema)  # the run's (EMA) weights


def test_bad_configs_are_refused(pipeline, tmp_path):
  from ldm_jax.train.ldm_setup import check_config
  not_a_pipeline = tmp_path / "empty"
  not_a_pipeline.mkdir()
  config = _config(str(not_a_pipeline))
  with pytest.raises(ValueError, match="model_index.json"):
    check_config(config)
  config = _config(pipeline)
  config.diffusion.parameterization = "v"
  with pytest.raises(ValueError, match="parameterization='v'.*'eps'"):
    check_config(config)
  config = _config(pipeline)
  config.cond.train_text_encoder = True
  config.first_stage.cache_dir = str(tmp_path / "cache")
  with pytest.raises(ValueError, match="train_text_encoder"):
    check_config(config)
  config = _config(pipeline)
  config.first_stage.downsample_factor = 8
  with pytest.raises(ValueError, match="downsamples by 2"):
    check_config(config)
  config = _config(pipeline)
  config.cond.kind = "text"
  with pytest.raises(ValueError, match="pipeline.path"):
    check_config(config)
