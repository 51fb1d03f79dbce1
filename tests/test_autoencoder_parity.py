"""ldm_jax's first-stage models against diffusers' PyTorch ones on the same weights."""

import warnings

import numpy as np
import pytest
import torch
from conftest import KL_F8_SMALL, KL_F16_SMALL, VQ_F4_SMALL, from_torch, to_torch

from ldm_jax.convert import load_autoencoder, save_autoencoder
from ldm_jax.convert.autoencoder import diffusers_config
from ldm_jax.convert.torch_layout import export_state, import_state
from ldm_jax.models.autoencoder import build_autoencoder

warnings.filterwarnings("ignore", message=".*accelerate.*")
diffusers = pytest.importorskip("diffusers")  # the [test] extra installs it

TOL = 1e-4


def _diffusers_model(spec, seed=0):
  """A randomly initialised diffusers model of `spec`'s topology, norms perturbed too."""
  config = diffusers_config(spec, 0.18215)
  klass = getattr(diffusers, config.pop("_class_name"))
  torch.manual_seed(seed)
  model = klass(**config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:  # GroupNorm weights start at 1/0; move them so they matter
        p.add_(0.1 * torch.randn_like(p))
  return model


def _load_from_diffusers(tmp_path, model):
  model.save_pretrained(tmp_path / "torch_model")
  return load_autoencoder(tmp_path / "torch_model")


@pytest.mark.parametrize("spec", [KL_F8_SMALL, KL_F16_SMALL], ids=["kl_f8", "kl_f16"])
def test_autoencoder_kl_matches_diffusers(tmp_path, images, spec):
  reference = _diffusers_model(spec)
  model = _load_from_diffusers(tmp_path, reference)
  assert model.spec.ch_mult == spec.ch_mult
  assert model.spec.attn_resolutions == spec.attn_resolutions

  with torch.no_grad():
    posterior_t = reference.encode(to_torch(images)).latent_dist
    z = torch.randn_like(posterior_t.mean)
    decoded_t = reference.decode(z).sample
  posterior = model.encode(images)
  decoded = model.decode(from_torch(z))

  np.testing.assert_allclose(posterior.mean, from_torch(posterior_t.mean), atol=TOL, rtol=0)
  np.testing.assert_allclose(posterior.logvar, from_torch(posterior_t.logvar), atol=TOL, rtol=0)
  np.testing.assert_allclose(decoded, from_torch(decoded_t), atol=TOL, rtol=0)
  assert np.abs(from_torch(decoded_t)).max() > 1e-2  # a non-trivial comparison


def test_vq_model_matches_diffusers(tmp_path, images):
  reference = _diffusers_model(VQ_F4_SMALL)
  with torch.no_grad():  # spread the codebook so several codes are in use
    reference.quantize.embedding.weight.normal_(0, 0.5)
  model = _load_from_diffusers(tmp_path, reference)
  assert model.spec.kind == "vq" and model.spec.n_embed == VQ_F4_SMALL.n_embed

  with torch.no_grad():
    h_t = reference.encode(to_torch(images)).latents
    z_q_t, loss_t, (_, _, indices_t) = reference.quantize(h_t)
    decoded_t = reference.decode(h_t).sample
  h = model.encode(images)
  quantized = model.quantize(h)
  decoded = model.decode(h)

  np.testing.assert_allclose(h, from_torch(h_t), atol=TOL, rtol=0)
  np.testing.assert_array_equal(np.asarray(quantized.indices).reshape(-1), indices_t.numpy())
  assert len(np.unique(indices_t.numpy())) > 3
  np.testing.assert_allclose(quantized.z_q, from_torch(z_q_t), atol=TOL, rtol=0)
  np.testing.assert_allclose(quantized.loss, loss_t.item(), rtol=1e-4)
  np.testing.assert_allclose(decoded, from_torch(decoded_t), atol=TOL, rtol=0)


@pytest.mark.parametrize("spec", [KL_F8_SMALL, KL_F16_SMALL, VQ_F4_SMALL],
                         ids=["kl_f8", "kl_f16", "vq_f4"])
def test_export_loads_in_diffusers_with_same_outputs(tmp_path, images, spec):
  model = build_autoencoder(spec)
  save_autoencoder(model, tmp_path / "export", format="diffusers")
  klass = diffusers.AutoencoderKL if spec.kind == "kl" else diffusers.VQModel
  reference = klass.from_pretrained(tmp_path / "export").eval()
  with torch.no_grad():
    encoded = reference.encode(to_torch(images))
    latent = encoded.latent_dist.mean if spec.kind == "kl" else encoded.latents
    decoded_t = reference.decode(latent).sample
  latent_jax = model.encode(images).mean if spec.kind == "kl" else model.encode(images)
  np.testing.assert_allclose(latent_jax, from_torch(latent), atol=TOL, rtol=0)
  np.testing.assert_allclose(model.decode(latent_jax), from_torch(decoded_t), atol=TOL, rtol=0)


def test_compvis_file_read_by_diffusers_converter(tmp_path, images):
  """A CompVis-layout export, read by diffusers' own CompVis converter, gives our outputs.

  That converter knows the CompVis names independently of ldm_jax (kl-f8 topology, the
  one it supports), so this checks our CompVis layout from outside.
  """
  from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
  from safetensors.torch import load_file

  model = build_autoencoder(KL_F8_SMALL)
  _perturb_norms(model)
  save_autoencoder(model, tmp_path / "vae.safetensors", format="compvis")
  checkpoint = {f"first_stage_model.{k}": v
                for k, v in load_file(tmp_path / "vae.safetensors").items()}
  config = diffusers_config(KL_F8_SMALL, 0.18215)
  config.pop("_class_name")
  reference = diffusers.AutoencoderKL(**config).eval()
  reference.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, config), strict=True)

  with torch.no_grad():
    posterior_t = reference.encode(to_torch(images)).latent_dist
    decoded_t = reference.decode(posterior_t.mean).sample
  posterior = model.encode(images)
  np.testing.assert_allclose(posterior.mean, from_torch(posterior_t.mean), atol=TOL, rtol=0)
  np.testing.assert_allclose(model.decode(posterior.mean), from_torch(decoded_t), atol=TOL,
                             rtol=0)


def test_full_size_configs_match_diffusers_shapes():
  """The published kl-f8 and kl-f16 configs give exactly diffusers' tensor names and shapes."""
  import importlib.util

  from ldm_jax.convert import keymaps
  from ldm_jax.convert.autoencoder import spec_from
  from ldm_jax.convert.torch_layout import torch_leaves
  from ldm_jax.models.autoencoder import abstract_autoencoder

  for name in ("kl_f8", "kl_f16"):
    module_spec = importlib.util.spec_from_file_location(name, f"configs/{name}.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    spec = spec_from(module.get_config())
    ours = {k: v.shape for k, v in torch_leaves(abstract_autoencoder(spec)).items()}
    ours = {keymaps.to_diffusers_key(k, len(spec.ch_mult)): s for k, s in ours.items()}
    config = diffusers_config(spec, 0.18215)
    config.pop("_class_name")
    with torch.device("meta"):
      reference = diffusers.AutoencoderKL(**config)
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    theirs = {k: (s[:2] if "attentions" in k and k.endswith("weight") and len(s) == 2
                  else s) for k, s in theirs.items()}
    ours = {k: (s[:2] if "attentions" in k and k.endswith("weight") and len(s) == 4 else s)
            for k, s in ours.items()}
    assert ours == theirs, name
  assert sum(np.prod(s) for s in ours.values()) > 0


def _perturb_norms(model):
  state = export_state(model)
  rng = np.random.default_rng(0)
  for key in state:
    if ".norm" in key:
      state[key] = state[key] + rng.normal(0, 0.1, state[key].shape).astype(np.float32)
  import_state(model, state, "perturbed")
