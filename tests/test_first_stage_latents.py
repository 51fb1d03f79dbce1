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
  scale, shift = first_stage.std_normalization(z)
  np.testing.assert_allclose(float(scale), reference, rtol=1e-6)
  assert float(shift) == 0.0  # the reference's scale_by_std does not centre
  scale, shift = first_stage.std_normalization(z, shift=True)
  flat = torch.from_numpy(np.array(z)).flatten()
  np.testing.assert_allclose([float(scale), float(shift)],
                             [1.0 / flat.std().item(), flat.mean().item()], rtol=1e-5)


def test_kl_latents_sample_the_posterior_and_denormalize_undoes_the_scale_and_shift():
  model = build_autoencoder(KL_F8_SMALL, nnx.Rngs(0))
  x = _images()
  z1 = first_stage.encode(model, x, jax.random.key(1))
  z2 = first_stage.encode(model, x, jax.random.key(2))
  assert z1.shape == (2, 4, 4, 4) and not np.allclose(z1, z2)
  norm = (0.5, 0.25)
  np.testing.assert_allclose(first_stage.normalize(z1, norm), (z1 - 0.25) * 0.5, rtol=1e-6)
  np.testing.assert_allclose(first_stage.denormalize(first_stage.normalize(z1, norm), norm),
                             z1, atol=1e-6)


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


def test_checkpoint_from_before_the_shift_restores_with_shift_zero(tmp_path):
  """LDM checkpoints written before LDMState had `shift_factor` resume with shift 0 (the
  normalization they trained with); newer ones keep their own."""
  import orbax.checkpoint as ocp

  from ldm_jax.train import checkpoint, ldm_step
  fields = dict(step=jnp.asarray(7, jnp.int32), params={"w": jnp.ones((3,))}, rest={},
                opt_state={"mu": jnp.zeros((3,))}, ema=None,
                scale_factor=jnp.asarray(0.25, jnp.float32), rng=jnp.zeros((2,), jnp.uint32))
  with ocp.CheckpointManager(tmp_path / "checkpoints", item_names=("state",),
                             options=ocp.CheckpointManagerOptions(create=True)) as manager:
    manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(fields)))  # old
    manager.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(
        ldm_step.LDMState(**fields, shift_factor=jnp.asarray(0.5, jnp.float32)))))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        ldm_step.LDMState(**fields, shift_factor=jnp.zeros((), jnp.float32)))
  old, _ = checkpoint.restore_state_only(str(tmp_path), target, 1)
  assert float(old.shift_factor) == 0.0 and float(old.scale_factor) == 0.25
  assert int(old.step) == 7 and np.array_equal(old.params["w"], np.ones(3))
  new, _ = checkpoint.restore_state_only(str(tmp_path), target, 2)
  assert float(new.shift_factor) == 0.5
