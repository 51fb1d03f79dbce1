"""Stable Diffusion sampling (ldm_jax.sd) against diffusers' pipelines on tiny random
components (tests/sd_fixtures.py), and the sampling command's --pipeline mode.

Parity runs the same initial noise through both: diffusers' `latents=` is NCHW, ldm_jax's
`init_noise` NHWC. diffusers draws the VAE posterior sample (img2img, inpainting) from its
generator; replaying that generator gives the same draws to pass as `posterior_noise`.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

import diffusers  # the [test] extra installs it (and torch)
import torch

from conftest import cpu_env  # noqa: E402
from sd_fixtures import PROMPTS, build_diffusers_pipeline  # noqa: E402

from ldm_jax import sd  # noqa: E402
from ldm_jax.convert.pipeline import load_pipeline  # noqa: E402
from ldm_jax.diffusion import samplers  # noqa: E402

STEPS = 10
SIZE = 16  # pixels: the tiny VAE downsamples x2, latents are 8x8


def _nhwc(x):
  return x.numpy().transpose(0, 2, 3, 1)


def _unit(images):
  """ldm_jax's [-1, 1] as diffusers' output_type="np" [0, 1]."""
  return (np.asarray(images) + 1.0) / 2.0


def _tensor01(images):
  """NHWC [-1, 1] as the NCHW [0, 1] tensor diffusers' image processors take."""
  return torch.from_numpy((images.transpose(0, 3, 1, 2) + 1) / 2)


def _noise(seed, batch=2, channels=4):
  return torch.randn((batch, channels, SIZE // 2, SIZE // 2),
                     generator=torch.Generator().manual_seed(seed))


def _photo(batch=2, seed=0):
  """Smooth images in [-1, 1]: something a VAE reconstructs differently from noise."""
  y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
  rng = np.random.default_rng(seed)
  phases = rng.uniform(0, 2 * np.pi, (batch, 1, 1, 3))
  return np.sin(2 * np.pi * (x + y)[None, ..., None] + phases).astype(np.float32) * 0.8


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
  pipe, folder = build_diffusers_pipeline(tmp_path_factory.mktemp("sd"))
  return pipe, folder, load_pipeline(folder)


def test_txt2img_matches_diffusers_ddim(sd1, tmp_path):
  pipe, folder, ours = sd1
  latents = _noise(0)
  ref = pipe(list(PROMPTS), num_inference_steps=STEPS, guidance_scale=7.5, latents=latents,
             output_type="np").images
  got = sd.txt2img(ours, list(PROMPTS), steps=STEPS, guidance=7.5, init_noise=_nhwc(latents))
  assert got.shape == (2, SIZE, SIZE, 3)  # sample_size * 8 by default: here 8 * 2
  np.testing.assert_allclose(_unit(got), ref, atol=1e-3)

  # A negative prompt takes the empty prompt's place on the unconditional side.
  ref = pipe(list(PROMPTS), negative_prompt=["red painting"] * 2, num_inference_steps=STEPS,
             guidance_scale=7.5, latents=latents, output_type="np").images
  got = sd.txt2img(ours, list(PROMPTS), negative_prompt="red painting", steps=STEPS,
                   init_noise=_nhwc(latents))
  np.testing.assert_allclose(_unit(got), ref, atol=1e-3)

  # The single-file form of the same pipeline samples the same images.
  from ldm_jax.convert.pipeline import save_pipeline
  single = tmp_path / "sd1.safetensors"
  save_pipeline(ours, single, format="single_file")
  again = sd.txt2img(load_pipeline(single, tokenizer=f"{folder}/tokenizer"), list(PROMPTS),
                     negative_prompt="red painting", steps=STEPS, init_noise=_nhwc(latents))
  np.testing.assert_allclose(_unit(again), ref, atol=1e-3)


def test_ddim_schedule_is_diffusers_and_samplers():
  from diffusers import DDIMScheduler
  for spacing, offset, to_one in (("leading", 1, False), ("trailing", 0, True),
                                  ("linspace", 0, False), ("leading", 0, True)):
    config = sd.SchedulerConfig(timestep_spacing=spacing, steps_offset=offset,
                                set_alpha_to_one=to_one)
    ref = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        timestep_spacing=spacing, steps_offset=offset,
                        set_alpha_to_one=to_one)
    for steps in (1, 7, 10, 50):
      ref.set_timesteps(steps)
      ts, a, a_prev = sd.ddim_schedule(config, steps)
      np.testing.assert_array_equal(ts, ref.timesteps.numpy())
      np.testing.assert_allclose(a, ref.alphas_cumprod[ts].numpy(), rtol=1e-5)
      prev = ts - 1000 // steps
      want = [ref.alphas_cumprod[p].item() if p >= 0 else ref.final_alpha_cumprod.item()
              for p in prev]
      np.testing.assert_allclose(a_prev, want, rtol=1e-5)
  # SD's settings are samplers.ddim's "uniform" table (what LDM workdirs sample with).
  ts, _, _ = sd.ddim_schedule(sd.SchedulerConfig(), 7)
  np.testing.assert_array_equal(ts[::-1], samplers.ddim_timesteps(1000, 7))
  with pytest.raises(ValueError, match="timestep_spacing"):
    sd.ddim_schedule(sd.SchedulerConfig(timestep_spacing="karras"), 10)
  with pytest.raises(ValueError, match="outside"):
    sd.ddim_schedule(sd.SchedulerConfig(), 1000)  # leading + offset 1 reaches t = 1000


def test_txt2img_v_prediction(sd1):
  """The same weights read as a v-prediction model on both sides (building an SD2-v
  pipeline too would double this file's time; the loaders test SD2 against diffusers)."""
  import dataclasses

  from diffusers import DDIMScheduler, StableDiffusionPipeline
  pipe, _, ours = sd1
  v_pipe = StableDiffusionPipeline(**{**pipe.components, "scheduler": DDIMScheduler.from_config(
      pipe.scheduler.config, prediction_type="v_prediction")})
  v_pipe.set_progress_bar_config(disable=True)
  v_ours = dataclasses.replace(ours, scheduler=dataclasses.replace(
      ours.scheduler, prediction_type="v_prediction"))
  latents = _noise(1)
  ref = v_pipe(list(PROMPTS), num_inference_steps=STEPS, guidance_scale=7.5,
               latents=latents, output_type="np").images
  got = sd.txt2img(v_ours, list(PROMPTS), steps=STEPS, init_noise=_nhwc(latents))
  np.testing.assert_allclose(_unit(got), ref, atol=1e-3)


def test_img2img(sd1):
  from diffusers import StableDiffusionImg2ImgPipeline
  pipe, _, ours = sd1
  photo = _photo()
  noise = _noise(2)
  # Strength 0 runs no step: the image's VAE reconstruction (posterior mean; diffusers'
  # VAE computes it here, which is faster than JAX op by op).
  with torch.no_grad():
    mean = pipe.vae.encode(torch.from_numpy(photo.transpose(0, 3, 1, 2))).latent_dist.mean
    recon = _nhwc(pipe.vae.decode(mean).sample.clamp(-1, 1))
  got = sd.img2img(ours, photo, list(PROMPTS), strength=0.0, steps=STEPS,
                   init_noise=_nhwc(noise))
  np.testing.assert_allclose(np.asarray(got), recon, atol=1e-4)
  # Strength 1 runs every step from the latents noised to the first timestep, as diffusers
  # does (alphas_cumprod[901] is not 0: a trace of the image is left): txt2img from there.
  latents = _nhwc(mean) * ours.latent_scale
  ab = sd.ddim_schedule(ours.scheduler, STEPS)[1][0]
  start = np.sqrt(ab) * latents + np.sqrt(1 - ab) * _nhwc(noise)
  full = sd.img2img(ours, photo, list(PROMPTS), strength=1.0, steps=STEPS,
                    init_noise=_nhwc(noise))
  txt = sd.txt2img(ours, list(PROMPTS), steps=STEPS, init_noise=start)
  np.testing.assert_allclose(np.asarray(full), np.asarray(txt), atol=1e-4)

  # diffusers at strength 0.6: its generator draws the posterior sample, then the noise.
  generator = torch.Generator().manual_seed(3)
  posterior, added = (torch.randn((2, 4, 8, 8), generator=generator) for _ in range(2))
  image_pipe = StableDiffusionImg2ImgPipeline(**pipe.components)
  image_pipe.set_progress_bar_config(disable=True)
  ref = image_pipe(list(PROMPTS), image=_tensor01(photo),
                   strength=0.6, num_inference_steps=STEPS, guidance_scale=7.5,
                   generator=torch.Generator().manual_seed(3), output_type="np").images
  got = sd.img2img(ours, photo, list(PROMPTS), strength=0.6, steps=STEPS,
                   init_noise=_nhwc(added), posterior_noise=_nhwc(posterior))
  np.testing.assert_allclose(_unit(got), ref, atol=1e-3)

  for strength in (-0.1, 1.5):
    with pytest.raises(ValueError, match=r"strength=.* must lie in \[0, 1\]"):
      sd.img2img(ours, photo, "a cat", strength=strength)
  for bad in (dict(strength=float("nan")), dict(guidance=float("nan")),
              dict(guidance=float("inf")), dict(eta=float("-inf"))):
    with pytest.raises(ValueError, match="must be a finite number"):
      sd.img2img(ours, photo, "a cat", **bad)
  with pytest.raises(ValueError, match="guidance=nan must be a finite number"):
    sd.txt2img(ours, "a cat", guidance=float("nan"))
  with pytest.raises(ValueError, match="sampler='ddim'"):
    sd._run(ours, ["a"], None, None, sampler="plms", steps=2, guidance=1.0, eta=0.0,
            key=None, source="image")
  with pytest.raises(ValueError, match="inpainting pipeline"):
    sd.inpaint(ours, photo, np.zeros((2, SIZE, SIZE)), "a cat")


def test_inpaint_matches_diffusers(tmp_path):
  pipe, folder = build_diffusers_pipeline(tmp_path, inpaint=True)
  ours = load_pipeline(folder)
  assert ours.is_inpaint
  photo = _photo(seed=1)
  mask = np.zeros((2, SIZE, SIZE), np.float32)
  mask[:, 4:12, 2:10] = 1.0
  latents = _noise(4)
  # With latents= given, the generator's first draw is the masked image's posterior sample.
  posterior = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(5))
  ref = pipe(list(PROMPTS), image=_tensor01(photo),
             mask_image=torch.from_numpy(mask[:, None]), height=SIZE, width=SIZE,
             num_inference_steps=STEPS, guidance_scale=7.5, latents=latents,
             generator=torch.Generator().manual_seed(5), output_type="np").images
  got = sd.inpaint(ours, photo, mask, list(PROMPTS), steps=STEPS, init_noise=_nhwc(latents),
                   posterior_noise=_nhwc(posterior))
  np.testing.assert_allclose(_unit(got), ref, atol=1e-3)
  with pytest.raises(ValueError, match="inpainting pipeline"):
    sd.txt2img(ours, "a cat")


def test_photos_are_prepared_as_diffusers(tmp_path):
  """--image / --mask become what diffusers' pipelines make of the same files:
  load_image, then VaeImageProcessor (rounded down to the VAE's factor, Lanczos) and
  the inpainting pipelines' mask processor; pixel for pixel."""
  from diffusers.image_processor import VaeImageProcessor
  from diffusers.utils import load_image
  from PIL import Image
  from skimage import data
  photo, mask_file = tmp_path / "chelsea.png", tmp_path / "mask.png"
  Image.fromarray(data.chelsea()).save(photo)  # 451x300: no side a multiple of 8
  ramp = np.linspace(0, 255, 451)[None] * np.linspace(0, 1, 300)[:, None]
  Image.fromarray(ramp.astype(np.uint8)).save(mask_file)  # grey levels around 0.5 too
  image, mask = sd.load_image(str(photo)), sd.load_image(str(mask_file))
  for factor, height, width in ((8, None, None), (2, None, None), (8, 256, 320),
                                (8, 300, None)):
    ref = VaeImageProcessor(vae_scale_factor=factor).preprocess(
        load_image(str(photo)), height, width)
    got = sd.prepare_image(image, factor, height, width)
    assert got.shape[:2] == sd.processed_size(image, factor, height, width)
    np.testing.assert_array_equal(got, _nhwc(ref)[0])
    ref_mask = VaeImageProcessor(vae_scale_factor=factor, do_normalize=False,
                                 do_binarize=True, do_convert_grayscale=True).preprocess(
        load_image(str(mask_file)), height, width)
    got_mask = sd.prepare_mask(mask, factor, height, width)
    np.testing.assert_array_equal(got_mask >= 0.5, ref_mask.numpy()[0, 0] == 1)
  assert sd.processed_size(image, 8) == (296, 448)
  with pytest.raises(ValueError, match="at least 8 pixels a side"):
    sd.processed_size(image, 8, height=7)


def _sample(*args):
  return subprocess.run([sys.executable, "-m", "ldm_jax.sample", *args], env=cpu_env(),
                        capture_output=True, text=True, timeout=300)


CHECKS = r"""
import json, sys
from absl import flags
import ldm_jax.convert.pipeline as convert_pipeline
import ldm_jax.sample as sample
import ldm_jax.sd as sd

real, real_img2img = convert_pipeline.load_pipeline, sd.img2img
def stop(*args, **kwargs):
  raise RuntimeError("passed the checks")

def shape(pipe, image, *args, **kwargs):
  raise RuntimeError(f"img2img of {tuple(image.shape)}")

results = []
for argv in json.loads(sys.argv[1]):
  # The bad flag sets stop before loading; the last one samples for real.
  convert_pipeline.load_pipeline = stop if argv[0] == "x" else real
  sd.img2img = shape if argv[0] == "shape" else real_img2img  # "shape": stop at img2img
  flags.FLAGS.unparse_flags()
  try:
    flags.FLAGS(["sample"] + argv[1:])
    sample.main(["sample"])
    results.append("ok")
  except flags.Error as e:
    results.append(f"flag error: {e}")
  except SystemExit as e:
    results.append(str(e.code))
  except RuntimeError as e:
    results.append(str(e))
print(json.dumps(results))
"""


def test_sample_command_pipeline_mode(sd1, tmp_path):
  from PIL import Image
  _, folder, _ = sd1
  out = tmp_path / "grid.png"
  photo = tmp_path / "photo.png"
  Image.fromarray(((_photo(1)[0] + 1) * 127.5).astype(np.uint8)).save(photo)
  odd = tmp_path / "odd.png"  # 17x13: resized to 16x12 for the tiny VAE's factor 2
  Image.fromarray(((_photo(1)[0, :13, :] + 1) * 127.5).astype(np.uint8)).resize(
      (17, 13)).save(odd)
  np.save(tmp_path / "noise1.npy", np.zeros((1, 8, 8, 4), np.float32))
  np.save(tmp_path / "noise2.npy", _nhwc(_noise(6)))
  p, o = f"--pipeline={folder}", f"--out={out}"
  # Every bad flag set fails before any weight is read, in one process.
  cases = {
      ("x", p, o, "--prompt=a", "--strength=0.5"): "error: --strength applies to img2img",
      ("x", p, o, "--prompt=a", f"--image={photo}", "--strength=-1"): "error: strength=-1.0 "
                                                                       "must lie in [0, 1]",
      ("x", p, o, "--prompt=a", "--workdir=run"): "error: --pipeline and --workdir are excl",
      ("x", o, "--prompt=a"): "error: give --workdir",
      ("x", "--workdir=run", "--height=16"): "error: --height: only with --pipeline",
      ("x", p, o, "--prompt=a", "--class_id=3"): "error: --class_id: only with --workdir",
      ("x", p, o): "error: --pipeline needs --prompt",
      ("x", "--pipeline=nowhere", o, "--prompt=a"): "error: --pipeline=nowhere: no such",
      ("x", p, o, "--prompt=a", "--height=15"): "error: --height=15 must be a multiple of 8",
      ("x", p, o, "--prompt=a", f"--mask={photo}"): "error: --mask needs --image",
      ("x", p, o, "--prompt=a", f"--image={photo}", "--sampler=plms"): "error: img2img and",
      ("x", p, o, "--prompt=a", "--sampler=plms", "--eta=1"): "error: --eta applies to DDIM",
      ("x", p, o, "--prompt=a", "--init_noise=missing.npy"): "error: --init_noise=missing",
      ("x", p, o, "--prompt=a", f"--init_noise={tmp_path / 'noise1.npy'}", "--num=2"):
          "error: --init_noise holds shape (1, 8, 8, 4)",
      ("x", p, f"--out={tmp_path / 'grid.jpg'}", "--prompt=a"): "error: --out=",
      ("x", p, o, "--prompt=a"): "passed the checks",
      ("x", p, o, "--prompt=a", "--guidance=nan"): "error: --guidance=nan must be a finite",
      ("x", p, o, "--prompt=a", "--eta=inf"): "error: --eta=inf must be a finite number",
      ("x", p, o, "--prompt=a", f"--image={photo}", "--strength=nan"): "error: --strength=nan",
      # Photos of any size are resized as diffusers does; --height / --width choose the size.
      ("shape", p, o, "--prompt=a", f"--image={odd}"): "img2img of (1, 12, 16, 3)",
      ("shape", p, o, "--prompt=a", f"--image={odd}", "--height=8", "--width=24"):
          "img2img of (1, 8, 24, 3)",
      # img2img for real: a photo, its noise from a file. Two images of 10 steps as in
      # test_img2img, whose compiled program the session's XLA cache then holds.
      ("real", p, o, "--prompt=a dog", "--steps=10", "--num=2", f"--image={photo}",
       "--strength=0.5", f"--init_noise={tmp_path / 'noise2.npy'}"): "ok",
  }
  proc = subprocess.run([sys.executable, "-c", CHECKS, json.dumps([list(c) for c in cases])],
                        env=cpu_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(proc.stdout.strip().splitlines()[-1])
  for (case, expected), got in zip(cases.items(), results):
    assert got.startswith(expected) and "\n" not in got, (case, got)
  with Image.open(out) as im:
    assert im.size == (2 * SIZE, SIZE)  # two images side by side, no blank cells
    assert json.loads(im.text["ldm_jax_settings"])["strength"] == 0.5

  # As a user runs it: a clear message, no traceback.
  proc = _sample(p, "--prompt=a cat", o, f"--image={photo}", "--strength=1.5")
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == ("error: strength=1.5 must lie in [0, 1] (0 "
                                                  "keeps the image, 1 repaints it from almost "
                                                  "pure noise)")
  proc = _sample(p, "--prompt=a cat", o, "--guidance=nan")
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == "error: --guidance=nan must be a finite number"

  # txt2img: the shapes and steps of test_txt2img's program (the XLA cache holds it), one
  # PNG per image into a folder (an --out ending in /).
  folder = tmp_path / "cats"
  proc = _sample(p, "--prompt=a photo of a cat", "--negative_prompt=red", "--steps=10",
                 "--num=2", "--height=16", f"--out={folder}/")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "sampling: 100%" in proc.stderr  # the progress bar
  assert "compiled the sampling program for 2 images in " in proc.stderr
  assert sorted(f.name for f in folder.iterdir()) == [".ldm_jax_output.json", "00000.png",
                                                      "00001.png"]
  for index in range(2):
    with Image.open(folder / f"{index:05d}.png") as im:
      assert im.size == (SIZE, SIZE)
      assert im.text["prompt"] == "a photo of a cat" and im.text["negative_prompt"] == "red"
      settings = json.loads(im.text["ldm_jax_settings"])
    assert settings["steps"] == 10 and settings["sampler"] == "ddim" and settings["seed"] == 0
    assert settings["guidance"] == 7.5 and settings["num"] == 2
    assert settings["index"] == index and settings["height"] == SIZE
