"""Concat conditioning: the inputs, their layout, super-resolution training, sampling and
caching (hybrid inpainting trains end to end in test_train_ldm)."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import KL_F8_SMALL, cpu_env
from ldm_jax.models.autoencoder import build_autoencoder
from ldm_jax.train import concat, first_stage, ldm_step, ldm_trainer
from ldm_jax.train.ldm_setup import build_model
from ldm_jax.train.ldm_trainer import build_run, make_sampler
from test_train_ldm import _config


def test_random_masks_are_rectangles_inside_the_image_or_whole():
  masks = np.asarray(concat.random_masks(jax.random.key(0), 2000, 16, 0.25))
  assert masks.shape == (2000, 16, 16, 1) and set(np.unique(masks)) <= {0.0, 1.0}
  full = masks.reshape(2000, -1).all(axis=1)
  assert abs(full.mean() - 0.25) < 0.04  # includes the rare rectangle covering everything
  for m in masks[~full][:200, ..., 0]:
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    assert rows.size and cols.size  # never empty
    box = np.zeros_like(m)
    box[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = 1
    np.testing.assert_array_equal(m, box)  # one solid rectangle
  sides = [np.flatnonzero(m.any(0)).size for m in masks[~full][..., 0]]
  assert min(sides) >= 1 and max(sides) <= 15 and np.std(sides) > 2


def test_downsample_averages_and_rejects_uneven_sizes():
  flat = jnp.full((1, 8, 8, 3), 0.3)
  np.testing.assert_allclose(concat.downsample(flat, 4), np.full((1, 2, 2, 3), 0.3), atol=1e-6)
  with pytest.raises(ValueError, match="low_res_factor"):
    concat.downsample(jnp.zeros((1, 10, 10, 3)), 4)


def test_inpaint_input_is_mask_then_masked_latent(images):
  """Stable Diffusion's layout: [mask at latent size, scale * mean latent of the image with
  the masked pixels set to 0]."""
  model = build_autoencoder(KL_F8_SMALL, nnx.Rngs(0))
  spec = concat.ConcatSpec("inpaint")
  mask = np.zeros((2, 32, 32, 1), np.float32)
  mask[:, 8:24, 0:16] = 1
  fields = {"image": jnp.asarray(images), "inpaint_mask": jnp.asarray(mask)}
  out = concat.concat_input(spec, fields, (2, 4, 4, 4),
                            lambda x: first_stage.encode_mean(model, x), (0.5, 0.1))
  assert out.shape == (2, 4, 4, 5) and spec.channels(4) == 5
  np.testing.assert_array_equal(out[..., 0], mask[:, ::8, ::8, 0])
  # Normalized as the diffusion latents are: (z - shift) * scale.
  expected = 0.5 * (model.encode(jnp.asarray(images * (1 - mask))).mean - 0.1)
  np.testing.assert_allclose(out[..., 1:], expected, atol=1e-5)
  masked = np.asarray(concat.masked_image(fields))
  assert np.all(masked[:, 8:24, 0:16] == 0) and np.all(masked[:, :8] == images[:, :8])


def test_low_res_input_is_resized_to_the_latent_only_when_needed():
  spec = concat.ConcatSpec("low_res", low_res_factor=4)
  low = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3), minval=-1, maxval=1)
  same = concat.concat_input(spec, {"low_res": low}, (2, 8, 8, 3), None, (1.0, 0.0))
  np.testing.assert_array_equal(same, low)
  bigger = concat.concat_input(spec, {"low_res": low}, (2, 16, 16, 3), None, (1.0, 0.0))
  assert bigger.shape == (2, 16, 16, 3)
  assert spec.image_size({"low_res": low}, 999) == 32


def _trained_weights_model(config, run):
  """A model whose outputs depend on its inputs (a fresh UNet's zero-initialized output
  convolution predicts exactly zero)."""
  model = build_model(config, run.spec, 0)
  params = nnx.state(model.unet, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
  nnx.update(model.unet, jax.tree.map(
      lambda p: p + 0.05 * jax.random.normal(next(keys), p.shape), params))
  return ldm_step.new_state(model, run.programs, 1.0, 0)


def test_super_resolution_trains_samples_from_the_low_res_image_and_from_a_cache(
    tmp_path, vq_weights):
  config = _config("ldm_sr_vq4", vq_weights, num_steps=2)
  metrics = ldm_trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert np.isfinite(metrics["train/loss"])
  from PIL import Image
  grid = Image.open(tmp_path / "run" / "images" / "samples_0000002.png")
  assert grid.size == (2 * 32, 2 * 32)  # low-res inputs above their samples

  run = build_run(config, str(tmp_path))
  assert run.spec.in_channels == 6
  state = _trained_weights_model(config, run)
  sampler = make_sampler(run)
  key = jax.random.key(0)
  low = jax.random.uniform(jax.random.key(3), (2, 8, 8, 3), minval=-1, maxval=1)
  a = np.asarray(sampler(state, {"low_res": low}, run.first_stage_state, key, num=2))
  b = np.asarray(sampler(state, {"low_res": -low}, run.first_stage_state, key, num=2))
  assert a.shape == (2, 32, 32, 3) and np.abs(a - b).max() > 1e-3  # the input matters
  big = sampler(state, {"low_res": jnp.zeros((1, 16, 16, 3))}, run.first_stage_state, key,
                num=1)
  assert big.shape == (1, 64, 64, 3)  # output size follows the input

  # The cache keeps each crop's low-res image, and training takes it from the batch.
  cache = tmp_path / "cache"
  proc = subprocess.run(
      [sys.executable, "-m", "ldm_jax.cache_latents", "--config=configs/ldm_sr_vq4.py:tiny",
       f"--config.first_stage.path={vq_weights}", f"--out={cache}", "--splits=validation",
       "--max_examples=2"],
      env=cpu_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  from ldm_jax.data import latents
  record = next(latents.read_all(str(cache), "validation"))
  assert record["low_res"].shape == (8, 8, 3) and record["mean"].shape == (8, 8, 3)
  given = concat.training_fields(run.programs.concat, {"low_res": low, "mean": None}, key)
  assert given["low_res"] is low

  # The sampling command's input: any square size whose upscaled size the UNet can take.
  from PIL import Image
  from ldm_jax.train.sample_inputs import concat_fields
  for side in (8, 5):
    Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(tmp_path / f"low{side}.png")
  assert concat_fields(config, run.spec, 2, str(tmp_path / "low8.png"), None)[
      "low_res"].shape == (2, 8, 8, 3)
  with pytest.raises(ValueError, match="multiple of 8"):
    concat_fields(config, run.spec, 1, str(tmp_path / "low5.png"), None)
  with pytest.raises(ValueError, match="--mask is for inpainting"):
    concat_fields(config, run.spec, 1, str(tmp_path / "low8.png"), str(tmp_path / "low8.png"))


def test_concat_config_errors(tmp_path, kl_weights, vq_weights):
  config = _config("ldm_inpaint_kl8", kl_weights)
  config.unet.in_channels = 4
  with pytest.raises(ValueError, match="unet.in_channels=9"):
    build_run(config, str(tmp_path))
  config = _config("ldm_inpaint_kl8", kl_weights)
  config.first_stage.cache_dir = str(tmp_path)
  with pytest.raises(ValueError, match="latent cache"):
    build_run(config, str(tmp_path))
  config = _config("ldm_sr_vq4", vq_weights)
  config.cond.low_res_factor = 3
  with pytest.raises(ValueError, match="low_res_factor"):
    build_run(config, str(tmp_path))
  config = _config("ldm_sr_vq4", vq_weights)
  config.cond.concat = "depth"
  with pytest.raises(ValueError, match="cond.concat"):
    build_run(config, str(tmp_path))
