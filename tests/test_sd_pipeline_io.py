"""SD pipelines in and out (convert.pipeline) against diffusers, on tiny random pipelines
built by tests/sd_fixtures.py: a diffusers folder loads with diffusers' numbers, and both
exports (a diffusers folder, one SD single file) come back as they went out."""

import dataclasses
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import diffusers  # the [test] extra installs it (and torch)
import torch

import sd_fixtures as fx  # noqa: E402
from ldm_jax.convert.pipeline import PipelineError, load_pipeline, save_pipeline  # noqa: E402
from ldm_jax.convert.torch_layout import export_state  # noqa: E402
from ldm_jax.sd import Pipeline  # noqa: E402

ATOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
  pipe, folder = fx.build_diffusers_pipeline(tmp_path_factory.mktemp("sd1"))
  return pipe, folder, load_pipeline(folder)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
  pipe, folder = fx.build_diffusers_pipeline(tmp_path_factory.mktemp("sd2"), sd2=True,
                                             v_prediction=True, scheduler="pndm")
  return pipe, folder, load_pipeline(folder)


# One compiled UNet per architecture, shared by every pipeline loaded here (compiling is
# faster than running the tiny UNet op by op, and nnx.jit caches by graph structure).
_unet_jit = nnx.jit(lambda unet, x, t, c: unet(x, t, c))


def _unet_eps(ours: Pipeline, inpaint=False):
  x, t, c = fx.unet_inputs(inpaint)
  out = _unet_jit(ours.unet, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t),
                  jnp.asarray(c))
  return np.asarray(out).transpose(0, 3, 1, 2)


def _torch_eps(unet, inpaint=False):
  x, t, c = fx.unet_inputs(inpaint)
  with torch.no_grad():
    return unet(torch.tensor(x), torch.tensor(t), torch.tensor(c)).sample.numpy()


def _ids(pipe):
  return pipe.tokenizer(list(fx.PROMPTS), padding="max_length", max_length=77,
                        truncation=True, return_tensors="pt").input_ids


def _text(ours: Pipeline, ids):
  return np.asarray(ours.text_encoder(jnp.asarray(ids.numpy())))


def _same_weights(a: Pipeline, b: Pipeline):
  for name in ("unet", "vae", "text_encoder"):
    x, y = export_state(getattr(a, name)), export_state(getattr(b, name))
    assert sorted(x) == sorted(y), name
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=f"{name}: {key}")


def test_folder_matches_diffusers(sd1):
  pipe, _, ours = sd1
  assert ours.variant == "sd1" and ours.sample_size == fx.SAMPLE_SIZE
  assert ours.latent_scale == pytest.approx(0.18215) and ours.latent_shift == 0.0
  assert ours.scheduler.parameterization == "eps"
  assert dict(ours.scheduler.extra)["_class_name"] == "DDIMScheduler"
  np.testing.assert_allclose(_unet_eps(ours), _torch_eps(pipe.unet), atol=ATOL, rtol=ATOL)
  ids = _ids(pipe)
  np.testing.assert_array_equal(ours.tokenizer(list(fx.PROMPTS)), ids.numpy())
  with torch.no_grad():
    context = pipe.text_encoder(ids)[0].numpy()
  np.testing.assert_allclose(_text(ours, ids), context, atol=ATOL, rtol=ATOL)
  z = np.random.default_rng(3).standard_normal((1, 4, fx.SAMPLE_SIZE, fx.SAMPLE_SIZE))
  z = z.astype(np.float32)
  with torch.no_grad():
    image = pipe.vae.decode(torch.tensor(z)).sample.numpy()
  decoded = np.asarray(ours.vae.decode(jnp.asarray(z.transpose(0, 2, 3, 1))))
  np.testing.assert_allclose(decoded.transpose(0, 3, 1, 2), image, atol=ATOL, rtol=ATOL)
  np.testing.assert_allclose(np.asarray(ours.scheduler.schedule.alphas_cumprod),
                             pipe.scheduler.alphas_cumprod.numpy(), rtol=1e-5)


def test_diffusers_export_loads_in_diffusers(sd1, tmp_path):
  from diffusers import StableDiffusionPipeline
  pipe, _, ours = sd1
  out = tmp_path / "export"
  save_pipeline(ours, out)
  back = StableDiffusionPipeline.from_pretrained(str(out))
  assert type(back.scheduler).__name__ == "DDIMScheduler"
  assert back.safety_checker is None and back.feature_extractor is None
  for key in ("prediction_type", "timestep_spacing", "beta_schedule", "beta_start",
              "steps_offset", "set_alpha_to_one", "clip_sample"):
    assert back.scheduler.config[key] == pipe.scheduler.config[key], key
  assert back.vae.config.scaling_factor == pytest.approx(0.18215)
  assert back.unet.config.sample_size == fx.SAMPLE_SIZE
  for name in ("unet", "vae", "text_encoder"):
    theirs, mine = getattr(pipe, name).state_dict(), getattr(back, name).state_dict()
    assert sorted(theirs) == sorted(mine), name
    for key, value in theirs.items():
      torch.testing.assert_close(mine[key], value, rtol=0, atol=0, msg=f"{name}.{key}")
  np.testing.assert_array_equal(_ids(back).numpy(), _ids(pipe).numpy())
  np.testing.assert_allclose(_torch_eps(back.unet), _torch_eps(pipe.unet), atol=1e-6)
  # ldm_jax reads its own export back, and writes over it without overwrite=True.
  _same_weights(load_pipeline(out), ours)
  save_pipeline(ours, out)


def test_single_file_round_trip(sd1, tmp_path):
  pipe, folder, ours = sd1
  out = tmp_path / "sd1.safetensors"
  save_pipeline(ours, out, format="single_file")
  back = load_pipeline(out, tokenizer=os.path.join(folder, "tokenizer"))
  _same_weights(back, ours)
  assert back.unet.spec == ours.unet.spec
  # eos_token_id is read by pooling="eos" only; both pool at the argmax id.
  assert back.text_encoder.spec == dataclasses.replace(ours.text_encoder.spec,
                                                       eos_token_id=49407)
  assert (back.variant, back.sample_size, back.latent_scale) == ("sd1", fx.SAMPLE_SIZE,
                                                                 pytest.approx(0.18215))
  assert back.scheduler == ours.scheduler
  np.testing.assert_allclose(_unet_eps(back), _torch_eps(pipe.unet), atol=ATOL, rtol=ATOL)


def test_checkpoint_without_metadata(sd1, tmp_path):
  """A .ckpt as CompVis released them: no ldm_jax metadata, so the architecture comes from
  the shapes and SD1's 8 heads; the text tower's head split is given (SD's is 64 wide);
  its model_ema copy is read on request."""
  from ldm_jax.convert.pipeline import single_file_tensors
  pipe, folder, ours = sd1
  tensors, _ = single_file_tensors(ours)
  unet = {k: v for k, v in tensors.items() if k.startswith("model.diffusion_model.")}
  ema = {"model_ema.diffusion_model" + k[len("model.diffusion_model"):].replace(".", ""):
         2 * v for k, v in unet.items()}
  state = {k: torch.tensor(v) for k, v in {**tensors, **ema}.items() if k != "scale_factor"}
  ckpt = tmp_path / "sd1.ckpt"
  torch.save({"state_dict": state, "global_step": 7}, ckpt)
  tok = os.path.join(folder, "tokenizer")
  back = load_pipeline(ckpt, tokenizer=tok, text_num_heads=4, prediction_type="v")
  assert back.unet.spec == ours.unet.spec
  assert back.scheduler.parameterization == "v" and back.latent_scale == pytest.approx(0.18215)
  assert back.sample_size == 64  # a single file does not say; SD1's 512 px
  np.testing.assert_allclose(_unet_eps(back), _torch_eps(pipe.unet), atol=ATOL, rtol=ATOL)
  ids = _ids(pipe)
  np.testing.assert_allclose(_text(back, ids), _text(ours, ids), atol=1e-6)
  with_ema = load_pipeline(ckpt, tokenizer=tok, text_num_heads=4, use_ema=True)
  key = "conv_in.weight"
  np.testing.assert_array_equal(export_state(with_ema.unet)[key], 2 * export_state(ours.unet)[key])
  with pytest.raises(PipelineError, match="text_num_heads"):
    load_pipeline(ckpt, tokenizer=tok)


def test_sd2_folder_and_single_file(sd2, tmp_path):
  pipe, folder, ours = sd2
  assert ours.variant == "sd2" and ours.scheduler.parameterization == "v"
  assert dict(ours.scheduler.extra)["_class_name"] == "PNDMScheduler"
  assert ours.unet.spec.num_head_channels == 16 and ours.unet.spec.use_linear_in_transformer
  assert ours.text_encoder.spec.activation == "gelu"
  assert ours.tokenizer.pad_id == 0  # SD2 pads with "!"
  np.testing.assert_allclose(_unet_eps(ours), _torch_eps(pipe.unet), atol=ATOL, rtol=ATOL)
  ids = _ids(pipe)
  np.testing.assert_array_equal(ours.tokenizer(list(fx.PROMPTS)), ids.numpy())
  with torch.no_grad():
    context = pipe.text_encoder(ids)[0].numpy()
  np.testing.assert_allclose(_text(ours, ids), context, atol=ATOL, rtol=ATOL)
  # SD2's single-file layout: open_clip names, one block more than is run (penultimate).
  out = tmp_path / "sd2.safetensors"
  save_pipeline(ours, out, format="single_file")
  from ldm_jax.convert.files import read_tensors
  keys = read_tensors(out)
  assert "cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight" in keys
  back = load_pipeline(out, tokenizer=os.path.join(folder, "tokenizer"))
  assert back.variant == "sd2" and back.scheduler == ours.scheduler
  assert back.text_encoder.spec.output_layer == "penultimate"
  np.testing.assert_allclose(_text(back, ids), context, atol=ATOL, rtol=ATOL)
  _same_weights(back, ours)
  # Exported as a diffusers folder, the scheduler class and v-prediction survive.
  from diffusers import StableDiffusionPipeline
  save_pipeline(back, tmp_path / "sd2")
  again = StableDiffusionPipeline.from_pretrained(str(tmp_path / "sd2"))
  assert type(again.scheduler).__name__ == "PNDMScheduler"
  assert again.scheduler.config.prediction_type == "v_prediction"
  assert again.text_encoder.config.hidden_act == "gelu"
  assert again.text_encoder.config.num_hidden_layers == 2
  with torch.no_grad():
    np.testing.assert_allclose(again.text_encoder(ids)[0].numpy(), context, atol=1e-5)


def test_inpainting_and_transformers5_tokenizer(tmp_path):
  """A 9-channel UNet reads as an inpainting variant and is written back as one; a
  tokenizer/ with only tokenizer.json (what transformers 5 saves) reads too."""
  pipe, folder = fx.build_diffusers_pipeline(tmp_path, inpaint=True, hub_tokenizer_files=False)
  assert not os.path.exists(os.path.join(folder, "tokenizer", "vocab.json"))
  ours = load_pipeline(folder)
  assert ours.variant == "sd1-inpaint" and ours.unet.spec.in_channels == 9
  np.testing.assert_array_equal(ours.tokenizer(list(fx.PROMPTS)), _ids(pipe).numpy())
  save_pipeline(ours, tmp_path / "out")
  index = json.loads((tmp_path / "out" / "model_index.json").read_text())
  assert index["_class_name"] == "StableDiffusionInpaintPipeline"
  assert index["safety_checker"] == [None, None] and not index["requires_safety_checker"]


def test_bad_inputs(sd1, tmp_path):
  from safetensors.numpy import save_file
  _, folder, ours = sd1
  tok = os.path.join(folder, "tokenizer")
  from ldm_jax.convert.pipeline import single_file_tensors
  tensors, _ = single_file_tensors(ours)
  # Neither SD1 nor SD2: the text encoder is some other model.
  odd = {k: v for k, v in tensors.items() if not k.startswith("cond_stage_model.")}
  odd["cond_stage_model.embedding.weight"] = np.zeros((10, 32), np.float32)
  save_file(odd, str(tmp_path / "odd.safetensors"))
  with pytest.raises(PipelineError, match=r"neither SD1 nor SD2.*cond_stage_model\.embedding"):
    load_pipeline(tmp_path / "odd.safetensors", tokenizer=tok)
  # A component missing.
  unet_only = {k: v for k, v in tensors.items() if k.startswith("model.diffusion_model.")}
  save_file(unet_only, str(tmp_path / "unet.safetensors"))
  with pytest.raises(PipelineError, match=r"no VAE \(first_stage_model.*and no text encoder"):
    load_pipeline(tmp_path / "unet.safetensors", tokenizer=tok)
  # No tokenizer for a single file.
  save_pipeline(ours, tmp_path / "sd1.safetensors", format="single_file")
  with pytest.raises(PipelineError, match=r"pass tokenizer=PATH to a CLIP tokenizer folder"):
    load_pipeline(tmp_path / "sd1.safetensors")
  # Folders: no model_index.json; another pipeline class.
  with pytest.raises(PipelineError, match="without model_index.json"):
    load_pipeline(os.path.join(folder, "unet"))
  other = tmp_path / "other"
  shutil.copytree(folder, other)
  index = json.loads((other / "model_index.json").read_text())
  (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
  with pytest.raises(PipelineError, match="FluxPipeline"):
    load_pipeline(other)
  # A target ldm_jax did not write is refused.
  from ldm_jax.outputs import OutputError
  with pytest.raises(OutputError):
    save_pipeline(ours, folder)
