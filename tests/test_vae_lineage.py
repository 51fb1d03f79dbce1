"""Later VAE lineages: SD3 and FLUX.1 (16 latent channels, no quant convs, shifted latents)
and VAEs without mid-level attention, against diffusers on the same random weights.

Each topology is the published one at reduced width: what differs from SD 1.x is which
modules exist, and that is what loading, inference and export must get right.
"""

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
from conftest import from_torch, to_torch
from safetensors.numpy import save_file

from ldm_jax.convert import infer_spec, load_autoencoder, save_autoencoder
from ldm_jax.convert.autoencoder import diffusers_latent_scaling
from ldm_jax.convert.torch_layout import export_state
from ldm_jax.models.autoencoder import AutoencoderSpec, build_autoencoder

warnings.filterwarnings("ignore", message=".*accelerate.*")
import diffusers  # the [test] extra installs it

TOL = 1e-4
_SMALL = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=32,
              down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2)
# The published configs' distinguishing fields (stabilityai/stable-diffusion-3-medium-diffusers
# and black-forest-labs/FLUX.1-dev, vae/config.json).
SD3 = dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
           scaling_factor=1.5305, shift_factor=0.0609)
FLUX1 = dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
             scaling_factor=0.3611, shift_factor=0.1159)
# A KL VAE that keeps its quant convs and level attention but drops mid attention.
NO_MID_ATTENTION = dict(latent_channels=4, mid_block_add_attention=False,
                        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"))
LINEAGES = {"sd3": SD3, "flux1": FLUX1, "no_mid_attention": NO_MID_ATTENTION}
# How the single-file checkpoints nest their VAE: SD3's under first_stage_model., FLUX.1's
# ae.safetensors bare.
_SINGLE_FILE_PREFIX = {"sd3": "first_stage_model.", "flux1": "", "no_mid_attention": ""}


def _reference(fields, seed=0):
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKL(**{**_SMALL, **fields}).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:  # GroupNorm weights start at 1/0; move them so they matter
        p.add_(0.1 * torch.randn_like(p))
  return model


def _architecture(spec):
  """The spec with attention given per level: a bare file does not say its sample size
  (resolution then defaults to 256, and attn_resolutions scale with it)."""
  levels = tuple(spec.resolution // r for r in spec.attn_resolutions)
  return dataclasses.replace(spec, resolution=0, attn_resolutions=()), levels


def _assert_matches(model, reference, images):
  with torch.no_grad():
    posterior_t = reference.encode(to_torch(images)).latent_dist
    z = torch.randn_like(posterior_t.mean)
    decoded_t = reference.decode(z).sample
  posterior = model.encode(images)
  np.testing.assert_allclose(posterior.mean, from_torch(posterior_t.mean), atol=TOL, rtol=0)
  np.testing.assert_allclose(posterior.logvar, from_torch(posterior_t.logvar), atol=TOL, rtol=0)
  decoded_t = from_torch(decoded_t)
  np.testing.assert_allclose(model.decode(from_torch(z)), decoded_t, atol=TOL, rtol=0)
  assert np.abs(decoded_t).max() > 1e-2  # a non-trivial comparison


@pytest.mark.parametrize("lineage", list(LINEAGES))
def test_lineage_loads_matches_and_exports(tmp_path, images, lineage):
  fields = LINEAGES[lineage]
  reference = _reference(fields)
  reference.save_pretrained(tmp_path / "vae")

  model = load_autoencoder(tmp_path / "vae")
  spec = model.spec
  assert spec.z_channels == spec.embed_dim == fields["latent_channels"]
  assert spec.use_quant_conv == fields.get("use_quant_conv", True)
  assert spec.use_post_quant_conv == fields.get("use_post_quant_conv", True)
  assert spec.mid_block_attention == fields.get("mid_block_add_attention", True)
  assert (model.quant_conv is None) == (not spec.use_quant_conv)
  assert (model.decoder.mid.attn_1 is None) == (not spec.mid_block_attention)
  assert spec.attn_resolutions == ((16,) if lineage == "no_mid_attention" else ())
  _assert_matches(model, reference, images)

  # The same weights in the CompVis layout as one file, without ldm_jax's spec metadata:
  # the architecture comes from the tensor names alone.
  prefix = _SINGLE_FILE_PREFIX[lineage]
  single = tmp_path / f"{lineage}.safetensors"
  save_file({prefix + k: v for k, v in export_state(model).items()}, single)
  from_file = load_autoencoder(single)
  assert _architecture(from_file.spec) == _architecture(spec)
  _assert_matches(from_file, reference, images)

  # Export: the latent normalization read from the source folder goes back out.
  scaling = diffusers_latent_scaling(tmp_path / "vae")
  assert scaling["scaling_factor"] == reference.config.scaling_factor
  assert scaling["shift_factor"] == reference.config.shift_factor
  save_autoencoder(model, tmp_path / "export", format="diffusers", **scaling)
  back = diffusers.AutoencoderKL.from_pretrained(tmp_path / "export").eval()
  for field in ("scaling_factor", "shift_factor", "use_quant_conv", "use_post_quant_conv",
                "latent_channels", "mid_block_add_attention", "force_upcast"):
    assert back.config[field] == reference.config[field], field
  original, exported = reference.state_dict(), back.state_dict()
  assert original.keys() == exported.keys()
  for key in original:
    torch.testing.assert_close(exported[key], original[key], rtol=0, atol=0, msg=key)


# What diffusers' config.json says about the latents, per published VAE: SDXL's scale
# (stabilityai/stable-diffusion-xl-base-1.0, vae/), SD3's and FLUX.1's scale and shift
# (above), the fp16-fix VAE's force_upcast off (madebyollin/sdxl-vae-fp16-fix), and a
# VAE stating per-channel statistics (the fields Playground v2.5's uses; values made up).
LATENT_FIELDS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std",
                 "force_upcast", "use_quant_conv", "use_post_quant_conv")
STATED = {"sdxl": dict(latent_channels=4, scaling_factor=0.13025, force_upcast=True),
          "sd3": SD3, "flux1": FLUX1,
          "sdxl_fp16_fix": dict(latent_channels=4, scaling_factor=0.13025, force_upcast=False),
          "latent_statistics": dict(latent_channels=4, scaling_factor=0.5,
                                    latents_mean=[-1.5, 1.75, -1.25, 2.5],
                                    latents_std=[8.5, 6.0, 6.5, 5.25])}


def _latent_fields(config):
  return {k: list(v) if isinstance(v, (list, tuple)) else v
          for k, v in config.items() if k in LATENT_FIELDS}


@pytest.mark.parametrize("name", list(STATED))
def test_load_then_save_keeps_the_latent_fields(tmp_path, name):
  """`save_autoencoder(load_autoencoder(d))` states every latent field `d` does (not SD's
  0.18215 and no shift): straight to diffusers, and through a CompVis file, whose
  metadata carries them."""
  reference = _reference(STATED[name])
  reference.save_pretrained(tmp_path / "vae")
  expected = _latent_fields(reference.config)
  assert expected["scaling_factor"] == STATED[name]["scaling_factor"]

  model = load_autoencoder(tmp_path / "vae")
  save_autoencoder(model, tmp_path / "export")
  back = diffusers.AutoencoderKL.from_pretrained(tmp_path / "export")
  assert _latent_fields(back.config) == expected

  save_autoencoder(model, tmp_path / "vae.safetensors", format="compvis")
  save_autoencoder(load_autoencoder(tmp_path / "vae.safetensors"), tmp_path / "again")
  again = json.loads((tmp_path / "again" / "config.json").read_text())
  assert _latent_fields({k: again.get(k) for k in LATENT_FIELDS}) == expected


def test_sources_without_latent_fields_keep_the_defaults(tmp_path):
  """A CompVis file states nothing about its latents: the export writes diffusers'
  defaults (SD's scale, no shift, force_upcast), as before the fields were carried; a
  keyword still replaces one."""
  model = build_autoencoder(AutoencoderSpec(resolution=32, ch=32, ch_mult=(1, 2),
                                            num_res_blocks=1))
  save_file(export_state(model), tmp_path / "bare.safetensors")
  loaded = load_autoencoder(tmp_path / "bare.safetensors")
  save_autoencoder(loaded, tmp_path / "export")
  config = json.loads((tmp_path / "export" / "config.json").read_text())
  assert (config["scaling_factor"], config["shift_factor"], config["force_upcast"]) == (
      0.18215, None, True)
  assert "latents_mean" not in config and "latents_std" not in config
  save_autoencoder(loaded, tmp_path / "export", scaling_factor=0.5)
  assert json.loads((tmp_path / "export" / "config.json").read_text())["scaling_factor"] == 0.5
  with pytest.raises(TypeError, match="unknown arguments.*the latent fields are"):
    save_autoencoder(loaded, tmp_path / "export", scale_factor=0.5)


def test_norm_num_groups_loads_matches_and_exports(tmp_path, images):
  """diffusers' `norm_num_groups` (8: four channels per group at width 32, as the demos
  use): read from config.json, same numbers, written back; CompVis code cannot build it,
  so a CompVis export is refused with the way out."""
  reference = _reference({"latent_channels": 4, "norm_num_groups": 8})
  reference.save_pretrained(tmp_path / "vae")
  model = load_autoencoder(tmp_path / "vae")
  assert model.spec.norm_num_groups == 8 and model.decoder.norm_out.num_groups == 8
  _assert_matches(model, reference, images)
  save_autoencoder(model, tmp_path / "export", format="diffusers")
  back = diffusers.AutoencoderKL.from_pretrained(tmp_path / "export")
  assert back.config["norm_num_groups"] == 8
  with pytest.raises(ValueError, match="norm_num_groups=8.*format='diffusers'"):
    save_autoencoder(model, tmp_path / "vae.safetensors", format="compvis")
  assert not (tmp_path / "vae.safetensors").exists()


def test_spec_options_round_trip_through_compvis_metadata(tmp_path):
  spec = AutoencoderSpec(kind="kl", resolution=32, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                         attn_resolutions=(16,), z_channels=16, embed_dim=16,
                         use_quant_conv=False, use_post_quant_conv=False,
                         mid_block_attention=False)
  model = build_autoencoder(spec)
  tensors = export_state(model)
  assert not any("quant_conv" in k or ".mid.attn_1." in k for k in tensors)
  assert infer_spec(tensors, resolution=32) == spec  # level attention, no mid attention
  save_autoencoder(model, tmp_path / "ae.safetensors", format="compvis")
  assert load_autoencoder(tmp_path / "ae.safetensors").spec == spec
  save_autoencoder(model, tmp_path / "ae", format="diffusers", shift_factor=0.5)
  config = json.loads((tmp_path / "ae" / "config.json").read_text())
  assert (config["use_quant_conv"], config["use_post_quant_conv"],
          config["mid_block_add_attention"], config["shift_factor"]) == (False, False, False, 0.5)
  assert load_autoencoder(tmp_path / "ae").spec == spec


def test_no_quant_conv_needs_embed_dim_equal_z_channels():
  with pytest.raises(ValueError, match=r"use_quant_conv=False .* embed_dim \(4\) must equal "
                                       r"z_channels \(16\)"):
    AutoencoderSpec(ch=32, ch_mult=(1, 2), z_channels=16, embed_dim=4, use_quant_conv=False)
  with pytest.raises(ValueError, match="use_post_quant_conv=False"):
    AutoencoderSpec(ch=32, ch_mult=(1, 2), z_channels=16, embed_dim=4,
                    use_post_quant_conv=False)


def test_latent_scaling_is_none_outside_diffusers_folders(tmp_path):
  assert diffusers_latent_scaling(tmp_path / "missing") is None
  assert diffusers_latent_scaling(tmp_path) is None  # a folder without config.json


def test_a_finetune_records_its_sources_latent_scaling(tmp_path):
  """An export reads the scale and shift from the run's own record, not from a source
  that may have moved; a moved source without a record is an error, not a default."""
  import ml_collections
  from ldm_jax.train.autoencoder_trainer import (init_latent_scaling, measures_latent_scale,
                                                 record_latent_scaling)
  source, workdir = tmp_path / "vae", tmp_path / "run"
  source.mkdir()
  workdir.mkdir()
  (source / "config.json").write_text(json.dumps(
      {"_class_name": "AutoencoderKL", "scaling_factor": 0.3611, "shift_factor": 0.1159}))
  train = ml_collections.ConfigDict({"init_from": str(source)})
  scaling = init_latent_scaling(train, str(workdir))
  assert scaling == {"scaling_factor": 0.3611, "shift_factor": 0.1159}
  assert not measures_latent_scale(scaling)  # the source's scale stays; none is measured
  (source / "config.json").unlink()
  source.rmdir()
  with pytest.raises(FileNotFoundError, match="is gone.*latent_scaling.json"):
    init_latent_scaling(train, str(workdir))
  record_latent_scaling(str(workdir), scaling)
  assert init_latent_scaling(train, str(workdir)) == scaling
  assert init_latent_scaling(ml_collections.ConfigDict({"init_from": ""})) == {}
  assert measures_latent_scale({})  # from random init: the run measures its own


def test_vq_without_quant_conv_refuses_diffusers_export(tmp_path):
  spec = AutoencoderSpec(kind="vq", resolution=32, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                         z_channels=3, embed_dim=3, n_embed=16, use_quant_conv=False)
  model = build_autoencoder(spec)
  with pytest.raises(ValueError, match="VQModel always has quant_conv"):
    save_autoencoder(model, tmp_path / "vq", format="diffusers")
  save_autoencoder(model, tmp_path / "vq.safetensors", format="compvis")
  assert infer_spec(export_state(model), resolution=32) == spec
