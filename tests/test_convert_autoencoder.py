"""Weight files in and out: round trips, the accepted source layouts, and bad input."""

import json

import jax
import numpy as np
import pytest
import torch
from conftest import KL_F8_SMALL, KL_F16_SMALL, VQ_F4_SMALL
from safetensors.numpy import load_file, save_file

from ldm_jax.convert import infer_spec, load_autoencoder, save_autoencoder
from ldm_jax.convert.files import WeightFileError
from ldm_jax.convert.torch_layout import StateMismatchError, export_state
from ldm_jax.models.autoencoder import build_autoencoder


def _same_state(a, b):
  sa, sb = export_state(a), export_state(b)
  assert sa.keys() == sb.keys()
  for key in sa:
    np.testing.assert_array_equal(sa[key], sb[key], err_msg=key)


@pytest.mark.parametrize("spec", [KL_F8_SMALL, KL_F16_SMALL, VQ_F4_SMALL],
                         ids=["kl_f8", "kl_f16", "vq_f4"])
@pytest.mark.parametrize("fmt", ["compvis", "diffusers"])
def test_round_trip_is_identical(tmp_path, spec, fmt):
  model = build_autoencoder(spec, rngs=None)
  path = tmp_path / ("ae.safetensors" if fmt == "compvis" else "ae")
  save_autoencoder(model, path, format=fmt)
  loaded = load_autoencoder(path)  # architecture from the file itself
  assert loaded.spec.ch_mult == spec.ch_mult and loaded.spec.kind == spec.kind
  _same_state(model, loaded)
  loaded_with_config = load_autoencoder(path, config=spec)
  _same_state(model, loaded_with_config)


def _compvis_tensors(spec):
  model = build_autoencoder(spec)
  return model, export_state(model)


def test_ldm_checkpoint_with_prefix_and_state_dict_nesting(tmp_path):
  """An LDM Lightning .ckpt: keys under first_stage_model., nested in state_dict, plus loss.*."""
  model, tensors = _compvis_tensors(KL_F8_SMALL)
  checkpoint = {"state_dict": {f"first_stage_model.{k}": torch.from_numpy(v.copy())
                               for k, v in tensors.items()},
                "global_step": 10}
  checkpoint["state_dict"]["model.diffusion_model.out.2.weight"] = torch.zeros(4, 32, 3, 3)
  checkpoint["state_dict"]["first_stage_model.loss.logvar"] = torch.zeros(())
  torch.save(checkpoint, tmp_path / "ldm.ckpt")
  _same_state(model, load_autoencoder(tmp_path / "ldm.ckpt"))


def test_training_checkpoint_keeps_loss_keys_apart(tmp_path):
  from ldm_jax.convert.autoencoder import read_autoencoder_weights
  _, tensors = _compvis_tensors(KL_F8_SMALL)
  tensors["loss.logvar"] = np.zeros((), np.float32)
  tensors["loss.discriminator.main.0.weight"] = np.zeros((8, 3, 4, 4), np.float32)
  save_file(tensors, tmp_path / "train.safetensors")
  weights = read_autoencoder_weights(tmp_path / "train.safetensors")
  assert set(weights.loss) == {"logvar", "discriminator.main.0.weight"}
  assert not any(k.startswith("loss.") for k in weights.model)
  load_autoencoder(tmp_path / "train.safetensors")


def test_diffusers_bare_safetensors_and_pipeline_folder(tmp_path):
  model = build_autoencoder(KL_F16_SMALL)
  save_autoencoder(model, tmp_path / "pipe" / "vae", format="diffusers")
  _same_state(model, load_autoencoder(tmp_path / "pipe"))  # finds vae/
  bare = tmp_path / "pipe" / "vae" / "diffusion_pytorch_model.safetensors"
  loaded = load_autoencoder(bare, config=KL_F16_SMALL)
  _same_state(model, loaded)


def test_old_diffusers_attention_names(tmp_path):
  model = build_autoencoder(KL_F8_SMALL)
  save_autoencoder(model, tmp_path / "new", format="diffusers")
  tensors = load_file(tmp_path / "new" / "diffusion_pytorch_model.safetensors")
  renames = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
  old = {}
  for key, value in tensors.items():
    for new_name, old_name in renames.items():
      key = key.replace(new_name, old_name)
    old[key] = value
  save_file(old, tmp_path / "old.safetensors")
  _same_state(model, load_autoencoder(tmp_path / "old.safetensors", config=KL_F8_SMALL))


def test_infer_spec_from_published_layouts():
  for spec in (KL_F8_SMALL, KL_F16_SMALL, VQ_F4_SMALL):
    _, tensors = _compvis_tensors(spec)
    inferred = infer_spec(tensors, resolution=spec.resolution)
    assert inferred == spec


def test_vq_remap_round_trips_through_compvis(tmp_path):
  spec = VQ_F4_SMALL.__class__(**{**VQ_F4_SMALL.__dict__, "remap": (1, 5, 7),
                                  "unknown_index": "extra"})
  model = build_autoencoder(spec)
  save_autoencoder(model, tmp_path / "vq.safetensors", format="compvis")
  loaded = load_autoencoder(tmp_path / "vq.safetensors")
  np.testing.assert_array_equal(loaded.quantize.used[...], [1, 5, 7])
  with pytest.raises(ValueError, match="remap"):
    save_autoencoder(model, tmp_path / "vq_diffusers", format="diffusers")


# --- bad input --------------------------------------------------------------------------

def test_missing_file_and_wrong_suffix(tmp_path):
  with pytest.raises(WeightFileError, match="no weights at"):
    load_autoencoder(tmp_path / "nope.safetensors")
  (tmp_path / "weights.txt").write_text("hello")
  with pytest.raises(WeightFileError, match="unknown weight file type"):
    load_autoencoder(tmp_path / "weights.txt")
  (tmp_path / "empty_dir").mkdir()
  with pytest.raises(WeightFileError, match="diffusion_pytorch_model.safetensors"):
    load_autoencoder(tmp_path / "empty_dir")


def test_truncated_safetensors(tmp_path):
  model = build_autoencoder(KL_F8_SMALL)
  save_autoencoder(model, tmp_path / "ok.safetensors", format="compvis")
  data = (tmp_path / "ok.safetensors").read_bytes()
  (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
  with pytest.raises(WeightFileError, match="truncated"):
    load_autoencoder(tmp_path / "cut.safetensors")


def test_not_a_checkpoint(tmp_path):
  (tmp_path / "junk.ckpt").write_bytes(b"\x00not a pickle at all")
  with pytest.raises(WeightFileError, match="torch.load"):
    load_autoencoder(tmp_path / "junk.ckpt")
  save_file({"foo.weight": np.zeros((2, 2), np.float32)}, tmp_path / "other.safetensors")
  with pytest.raises(ValueError, match="not a first-stage autoencoder"):
    load_autoencoder(tmp_path / "other.safetensors")
  # A diffusers folder of another model is named by its config.json, before its tensors.
  unet = tmp_path / "unet"
  unet.mkdir()
  (unet / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
  save_file({"conv_in.weight": np.zeros((2, 2), np.float32)},
            unet / "diffusion_pytorch_model.safetensors")
  with pytest.raises(WeightFileError, match=r"holds a diffusers UNet2DConditionModel .*, not "
                     r"an autoencoder: give an AutoencoderKL or VQModel folder"):
    load_autoencoder(unet)


def test_config_that_does_not_match_lists_every_problem(tmp_path):
  model = build_autoencoder(KL_F8_SMALL)
  save_autoencoder(model, tmp_path / "kl.safetensors", format="compvis")
  with pytest.raises(StateMismatchError) as err:
    load_autoencoder(tmp_path / "kl.safetensors", config=KL_F16_SMALL)
  message = str(err.value)
  assert "missing" in message and "unexpected" in message and "wrong shape" in message
  assert "The weights look like: kind=kl ch=32 ch_mult=(1, 2, 4, 4)" in message


def test_missing_tensor_is_named_and_nothing_loaded(tmp_path):
  _, tensors = _compvis_tensors(KL_F8_SMALL)
  del tensors["decoder.conv_out.bias"]
  save_file(tensors, tmp_path / "partial.safetensors")
  with pytest.raises(StateMismatchError, match=r"1 missing: decoder\.conv_out\.bias"):
    load_autoencoder(tmp_path / "partial.safetensors", config=KL_F8_SMALL)


def test_export_is_atomic_and_replaces(tmp_path):
  model = build_autoencoder(KL_F8_SMALL)
  target = tmp_path / "export"
  save_autoencoder(model, target, format="diffusers")
  save_autoencoder(build_autoencoder(KL_F8_SMALL, rngs=__import__("flax").nnx.Rngs(1)),
                   target, format="diffusers")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp leftovers
  assert json.loads((target / "config.json").read_text())["_class_name"] == "AutoencoderKL"
  with pytest.raises(ValueError, match="format"):
    save_autoencoder(model, tmp_path / "x", format="onnx")
  with pytest.raises(ValueError, match="safetensors"):
    save_autoencoder(model, tmp_path / "x.ckpt", format="compvis")


def test_bfloat16_file_loads(tmp_path):
  import ml_dtypes
  _, tensors = _compvis_tensors(KL_F8_SMALL)
  save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()},
            tmp_path / "bf16.safetensors")
  loaded = load_autoencoder(tmp_path / "bf16.safetensors")
  exported = export_state(loaded)
  assert exported["decoder.conv_out.weight"].dtype == np.float32
  np.testing.assert_allclose(exported["decoder.conv_out.weight"],
                             tensors["decoder.conv_out.weight"], rtol=1e-2, atol=1e-3)
  assert jax.tree.leaves(loaded.encode(np.zeros((1, 32, 32, 3), np.float32)).mean)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_export_round_trips_to_rounded_weights(tmp_path, dtype):
  """save_autoencoder(dtype=): the file holds 16-bit tensors (half the bytes) that load
  back as float32 equal to the float32 weights rounded to that type; diffusers reads it."""
  import ml_dtypes
  model = build_autoencoder(KL_F8_SMALL, rngs=None)
  full, half = tmp_path / "full.safetensors", tmp_path / f"{dtype}.safetensors"
  save_autoencoder(model, full, format="compvis")
  save_autoencoder(model, half, format="compvis", dtype=dtype)
  stored = load_file(half)
  assert {str(v.dtype) for v in stored.values()} == {dtype}
  assert half.stat().st_size < 0.55 * full.stat().st_size
  want = {k: v.astype(getattr(ml_dtypes, dtype) if dtype == "bfloat16" else np.float16
                      ).astype(np.float32) for k, v in export_state(model).items()}
  got = export_state(load_autoencoder(half))
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  with pytest.raises(ValueError, match="dtype must be one of"):
    save_autoencoder(model, tmp_path / "x.safetensors", format="compvis", dtype="int8")
  folder = tmp_path / "diffusers"
  save_autoencoder(model, folder, format="diffusers", dtype="float16")
  import diffusers
  vae = diffusers.AutoencoderKL.from_pretrained(folder)
  assert vae.decoder.conv_out.weight.dtype == torch.float32  # diffusers casts on load
