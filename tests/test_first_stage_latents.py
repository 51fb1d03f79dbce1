"""The frozen first stage of an LDM: latents, their scale, and where the model comes from."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import KL_F8_SMALL, VQ_F4_SMALL
from ldm_jax.convert import save_autoencoder
from ldm_jax.models.autoencoder import build_autoencoder
from ldm_jax.train import first_stage


def _images(n=2, size=32):
  return jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (n, size, size, 3)), jnp.float32)


def test_scale_by_std_is_the_reference_unbiased_std():
  z = jax.random.normal(jax.random.key(0), (4, 8, 8, 4)) * 3.0 + 0.5
  reference = 1.0 / torch.from_numpy(np.array(z)).flatten().std().item()
  np.testing.assert_allclose(float(first_stage.std_scale_factor(z)), reference, rtol=1e-6)


def test_kl_latents_sample_the_posterior_and_decode_undoes_the_scale():
  model = build_autoencoder(KL_F8_SMALL, nnx.Rngs(0))
  x = _images()
  z1 = first_stage.encode(model, x, jax.random.key(1))
  z2 = first_stage.encode(model, x, jax.random.key(2))
  assert z1.shape == (2, 4, 4, 4) and not np.allclose(z1, z2)
  np.testing.assert_allclose(first_stage.decode(model, 0.5 * z1, 0.5), model.decode(z1),
                             atol=1e-5)


def test_vq_latents_are_pre_quantization():
  model = build_autoencoder(VQ_F4_SMALL, nnx.Rngs(0))
  x = _images()
  z = first_stage.encode(model, x, jax.random.key(0))
  np.testing.assert_array_equal(z, model.encode(x))


def test_load_first_stage_from_weights_and_errors(tmp_path):
  model = build_autoencoder(KL_F8_SMALL, nnx.Rngs(0))
  path = tmp_path / "vae.safetensors"
  save_autoencoder(model, path, format="compvis")
  loaded = first_stage.load_first_stage(str(path))
  np.testing.assert_array_equal(loaded.decoder.conv_out.kernel[...],
                                model.decoder.conv_out.kernel[...])
  with pytest.raises(ValueError, match="first_stage.path"):
    first_stage.load_first_stage("")
