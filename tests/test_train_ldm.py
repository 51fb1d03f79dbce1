"""LDM training end to end on tiny models: samples, resume keeps scale_by_std, guidance,
the sampling command and the exports."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import cpu_env
from ldm_jax.train import checkpoint, ldm_step, ldm_trainer
from ldm_jax.train.export import export_ldm_workdir
from ldm_jax.train.guard import NonFiniteError
from ldm_jax.train.ldm_setup import abstract_state, build_programs
from ldm_jax.train.ldm_trainer import build_run, make_sampler, sampler_fields
from ldm_jax.train.sample_inputs import concat_fields, condition_fields


def _config(name, first_stage, **train):
  spec = importlib.util.spec_from_file_location(name, f"configs/{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  # Relative, as a user types it: the run stores it absolute, so the workdir works from
  # any current directory.
  config.first_stage.path = os.path.relpath(first_stage)
  config.train.update(train)
  return config


def _saved_state(workdir):
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  run = build_run(config, str(workdir))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        abstract_state(config, run.spec, run.programs))
  return checkpoint.restore_state_only(str(workdir), target)


def test_text_inpainting_ldm_trains_resumes_samples_and_exports(tmp_path, kl_weights):
  """One hybrid run (a caption through cross-attention, the masked image concatenated):
  training, resume, guidance, the sampling command and both export layouts."""
  config = _config("ldm_inpaint_kl8", kl_weights, num_steps=2)
  metrics = ldm_trainer.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(metrics["train/loss"])
  # A grid at step 0 (the untrained model: the baseline) and at the end.
  assert sorted(os.listdir(tmp_path / "images")) == ["samples_0000000.png",
                                                     "samples_0000002.png"]
  state, step = _saved_state(tmp_path)
  assert step == 2
  scale = float(state.scale_factor)
  assert scale > 0 and scale != 1.0  # set by scale_by_std from the first batch

  resumed = _config("ldm_inpaint_kl8", kl_weights, num_steps=4)
  ldm_trainer.train_and_evaluate(resumed, str(tmp_path))
  state, step = _saved_state(tmp_path)
  assert step == 4 and float(state.scale_factor) == scale  # kept, not recomputed
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["first_stage"]["path"] == str(kl_weights)

  # Weights that blow up: the run stops at the first non-finite loss, and nothing after
  # step 4 is saved.
  blown = _config("ldm_inpaint_kl8", kl_weights, num_steps=8)
  blown.optim.base_learning_rate = 1e30
  with pytest.raises(NonFiniteError, match=r"non-finite loss .*newest checkpoint \(step 4\)"):
    ldm_trainer.train_and_evaluate(blown, str(tmp_path))
  assert checkpoint.saved_steps(tmp_path) == [2, 4]
  kept, step = _saved_state(tmp_path)
  assert step == 4
  for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)

  run = build_run(config, str(tmp_path))
  assert run.spec.in_channels == 9 and run.programs.cond_fields == ("tokens",)
  # Guidance drops the text, never the image: both sides see the same concat input.
  model = ldm_step.eval_model(run.programs, state)
  c = jnp.ones((1, 4, 4, 5))
  tokens = {"tokens": jnp.zeros((1, 32), jnp.int32)}
  assert model.encode_conditions(model.cond.null_fields(1), c)["concat"] is c
  assert model.encode_conditions(tokens, c)["context"].shape == (1, 32, 64)
  # The mask the trainer draws for its sample grid is the one sampler_fields makes.
  batch = {"image": np.zeros((2, 32, 32, 3), np.float32),
           "tokens": np.zeros((2, 32), np.int32)}
  fields = sampler_fields(run, batch, seed=5)
  assert set(fields) == {"tokens", "image", "inpaint_mask"}
  np.testing.assert_array_equal(fields["inpaint_mask"], sampler_fields(run, batch, 5)[
      "inpaint_mask"])
  # Tiled decoding (sample --tile): a tile as large as the image is the plain sampler; a
  # smaller one decodes 16-pixel windows, blended, to the same shape.
  key = jax.random.key(3)
  whole = np.asarray(make_sampler(run)(state, fields, run.first_stage_state, key, num=2))
  same = np.asarray(make_sampler(run, tile=32)(state, fields, run.first_stage_state, key,
                                               num=2))
  tiled = np.asarray(make_sampler(run, tile=16)(state, fields, run.first_stage_state, key,
                                                num=2))
  np.testing.assert_allclose(same, whole, atol=1e-5)
  assert tiled.shape == whole.shape and 1e-4 < np.abs(tiled - whole).mean() < 0.5

  # The sampling command on the finished run, with a photo and a mask.
  from PIL import Image
  photo = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
  Image.fromarray(photo).save(tmp_path / "photo.png")
  mask = np.zeros((32, 32), np.uint8)
  mask[8:24, 8:24] = 255
  Image.fromarray(mask).save(tmp_path / "mask.png")
  Image.fromarray(mask[:16, :16]).save(tmp_path / "small_mask.png")
  out = tmp_path / "grid.png"
  elsewhere = tmp_path / "elsewhere"  # not where the run was trained from
  elsewhere.mkdir()
  proc = subprocess.run(
      [sys.executable, "-m", "ldm_jax.sample", f"--workdir={tmp_path}", "--num=3", "--batch=3",
       "--steps=3", "--sampler=plms", "--guidance=2", "--prompt=a cat", "--tile=16",
       f"--image={tmp_path / 'photo.png'}", f"--mask={tmp_path / 'mask.png'}", f"--out={out}"],
      env=cpu_env(), capture_output=True, text=True, timeout=300, cwd=elsewhere)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with Image.open(out) as im:
    assert im.size == (3 * 32, 32)  # one row of 3: no blank cells
    settings = json.loads(im.text["ldm_jax_settings"])
  assert settings["sampler"] == "plms" and settings["steps"] == 3 and settings["prompt"] == (
      "a cat") and settings["guidance"] == 2 and settings["step"] > 0
  # What the command checks before it compiles anything.
  photo_path = str(tmp_path / "photo.png")
  fields = concat_fields(config, run.spec, 3, photo_path, str(tmp_path / "mask.png"))
  assert fields["image"].shape == (3, 32, 32, 3) and fields["inpaint_mask"].sum() == 3 * 256
  for mask_path, message in ((None, "--mask"), (str(tmp_path / "small_mask.png"), "16x16")):
    with pytest.raises(ValueError, match=message):
      concat_fields(config, run.spec, 1, photo_path, mask_path)
  with pytest.raises(ValueError, match="--prompt"):
    condition_fields(config, 1, class_id=2, prompt=None)

  # Both export layouts, read back by our loaders and by diffusers.
  from diffusers import AutoencoderKL, UNet2DConditionModel
  from ldm_jax.convert import load_autoencoder
  from ldm_jax.convert.unet import load_unet
  assert export_ldm_workdir(str(tmp_path), str(tmp_path / "ldm.safetensors"), "compvis") == 4
  load_unet(tmp_path / "ldm.safetensors", spec=dict(config.unet))
  load_autoencoder(tmp_path / "ldm.safetensors")  # first_stage_model.* of the same file
  export_ldm_workdir(str(tmp_path), str(tmp_path / "ldm_diffusers"), "diffusers")
  unet = UNet2DConditionModel.from_pretrained(tmp_path / "ldm_diffusers" / "unet")
  assert unet.config.in_channels == 9
  assert unet.config.sample_size == config.data.image_size // 8
  # The schedule and prediction type travel with the weights, as diffusers reads them.
  from diffusers import DDIMScheduler
  from ldm_jax.diffusion.schedules import Schedule
  scheduler = DDIMScheduler.from_pretrained(tmp_path / "ldm_diffusers" / "scheduler")
  np.testing.assert_allclose(scheduler.alphas_cumprod.double().numpy(),
                             Schedule.from_config(config.diffusion).alphas_cumprod, rtol=1e-6)
  assert scheduler.config.prediction_type == "epsilon"
  vae = AutoencoderKL.from_pretrained(tmp_path / "ldm_diffusers" / "vae")
  assert abs(vae.config.scaling_factor - scale) < 1e-6
  assert (tmp_path / "ldm_diffusers" / "cond" / "model.safetensors").exists()


def test_guidance_changes_class_conditional_samples(tmp_path, vq_weights):
  config = _config("ldm_cin256", vq_weights)
  run = build_run(config, str(tmp_path))
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


def test_sixteen_channel_vae_with_a_shift(tmp_path):
  """An SD3 / FLUX-style first stage (16 channels, no quant convs) whose diffusers
  config.json states a scale and a shift: the run takes both, trains on
  (z - shift) * scale, and its export's vae/config.json carries both."""
  import dataclasses

  from conftest import KL_F8_SMALL
  from ldm_jax.convert import save_autoencoder
  from ldm_jax.models.autoencoder import build_autoencoder
  from ldm_jax.train import first_stage
  from ldm_jax.train.ldm_setup import build_model
  spec = dataclasses.replace(KL_F8_SMALL, z_channels=16, embed_dim=16, use_quant_conv=False,
                             use_post_quant_conv=False)
  vae = tmp_path / "vae"
  save_autoencoder(build_autoencoder(spec, nnx.Rngs(3)), vae, scaling_factor=0.5,
                   shift_factor=0.2)
  config = _config("ldm_cin256", vae, num_steps=1, eval_at_start=False)
  config.first_stage.update(kind="kl", downsample_factor=8, scale_by_std=False)
  config.unet.update(in_channels=16, out_channels=16)
  assert first_stage.initial_normalization(config.first_stage) == (0.5, 0.2)
  config.first_stage.latent_scaling = "config"  # the config's 1.0 / 0.0 instead
  assert first_stage.initial_normalization(config.first_stage) == (1.0, 0.0)
  config.first_stage.latent_scaling = "auto"

  run = build_run(config, str(tmp_path / "run"))
  state = ldm_step.new_state(build_model(config, run.spec, 0), run.programs, 0.5, 0,
                             shift_factor=0.2)
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  _, metrics = jax.jit(ldm_step.make_train_step(run.programs))(
      state, {"image": images, "label": jnp.asarray([1, 2])}, run.first_stage_state)
  latent_key = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0),
                                4)[0]
  z = np.asarray(first_stage.encode(run.first_stage, images, latent_key))
  expected = (z - 0.2) * 0.5
  np.testing.assert_allclose([metrics["latent_mean"], metrics["latent_std"]],
                             [expected.mean(), expected.std()], rtol=1e-5, atol=1e-6)

  ldm_trainer.train_and_evaluate(config, str(tmp_path / "run"))
  saved, _ = _saved_state(tmp_path / "run")
  assert (float(saved.scale_factor), float(saved.shift_factor)) == (0.5, np.float32(0.2))
  export_ldm_workdir(str(tmp_path / "run"), str(tmp_path / "export"))
  exported = json.loads((tmp_path / "export" / "vae" / "config.json").read_text())
  assert exported["scaling_factor"] == 0.5
  assert exported["shift_factor"] == pytest.approx(0.2)
  assert exported["latent_channels"] == 16 and exported["use_quant_conv"] is False


def test_text_ldm_trains_on_arrayrecord_captions(tmp_path, kl_weights):
  """ArrayRecord records as msgpack maps (the image under data.image_key, the caption
  under cond.caption_key): the captions reach the batches' tokens and a tiny text LDM
  trains on them; records of raw image bytes have no caption and are refused."""
  import io

  from array_record.python.array_record_module import ArrayRecordWriter
  from flax import serialization
  from PIL import Image

  from ldm_jax.data.pipeline import train_iterator
  from ldm_jax.data.spec import DataSpec
  from ldm_jax.train.ldm_setup import condition_spec, tokenizer
  rng = np.random.default_rng(0)

  def png():
    encoded = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 44, 3), np.uint8)).save(encoded, format="PNG")
    return encoded.getvalue()

  def write(path, records):
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for record in records:
      writer.write(record)
    writer.close()
    return str(path)

  captions = [f"photo number {i}" for i in range(6)]
  path = write(tmp_path / "captioned.array_record",
               [serialization.msgpack_serialize({"image": png(), "caption": caption})
                for caption in captions])
  config = _config("ldm_txt2img", kl_weights, num_steps=1, eval_at_start=False)
  config.data.update(source="arrayrecord", path=path)
  batch = next(train_iterator(DataSpec.from_config(config.data), global_batch_size=2, seed=0,
                              process_index=0, process_count=1,
                              conditions=condition_spec(config)))
  assert batch["image"].shape == (2, 32, 32, 3)
  assert {tokenizer(config).decode(t) for t in batch["tokens"]} <= set(captions)
  metrics = ldm_trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert np.isfinite(metrics["train/loss"])

  config.data.path = write(tmp_path / "raw.array_record", [png() for _ in range(3)])
  with pytest.raises(ValueError, match="holds an image and no caption"):
    build_run(config, str(tmp_path / "raw_run"))


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
  config = _config("ldm_txt2img", kl_weights)
  config.optim.accumulate_grad_batches = 2  # would only have scaled the learning rate
  with pytest.raises(ValueError, match="does not accumulate"):
    build_programs(config, None)
  config = _config("ldm_txt2img", kl_weights)
  config.train.on_nonfinite = "ignore"
  with pytest.raises(ValueError, match="on_nonfinite"):
    build_programs(config, None)
  config = _config("ldm_txt2img", tmp_path / "moved_away.safetensors")
  with pytest.raises(FileNotFoundError, match="--first_stage=PATH"):
    build_run(config, str(tmp_path))
