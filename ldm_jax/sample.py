"""Samples from a trained LDM workdir or a Stable Diffusion pipeline, as one PNG grid (laid
out for the number of images: train.images.grid_columns) or one PNG per image.

  python -m ldm_jax.sample --workdir=DIR --num=16 --steps=50 --sampler=ddim \
      --guidance=5 [--class_id=N | --prompt="a photo of a cat"] --out=grid.png
  python -m ldm_jax.sample --pipeline=SD_FOLDER_OR_FILE [--tokenizer=DIR] \
      --prompt="a photo of a cat" [--negative_prompt=...] [--height=512 --width=512] \
      [--image=photo.png [--strength=0.8] [--mask=mask.png]] [--init_noise=noise.npy]

--pipeline reads a diffusers pipeline folder or an SD 1.x / 2.x single file (which needs
--tokenizer) and samples it as ldm_jax.sd does: txt2img, img2img with --image (SDEdit;
--strength in [0, 1]), inpainting with --image and --mask on an inpainting pipeline.
Defaults follow diffusers: 50 DDIM steps, guidance 7.5, the UNet's trained size.
--init_noise (an .npy of NHWC latent noise, one per image) reproduces another
implementation's samples. The grid's PNG text holds the prompt and every setting.
--individual (or an --out naming a folder) writes 00000.png, 00001.png, ... into the
folder --out instead, each PNG's text holding the settings and its index.

Concat-conditioned models take an image: `--image=low_res.png` for super-resolution (the
output is cond.low_res_factor times its size), `--image=photo.png --mask=mask.png` for
inpainting (white in the mask = repaint; the output has the photo's size).

Uses the EMA weights of the newest checkpoint (or --step), the first stage named in the
run's config (or --first_stage, when it moved), and its latent scale. Each batch is one
compiled sampling loop; the bar counts batches. Everything the flags name is checked
before anything is built; an existing --out is replaced only when ldm_jax wrote it as
samples (or with --overwrite).
"""

from __future__ import annotations

from absl import app, flags, logging

from ldm_jax.diffusion.samplers import SAMPLERS
from ldm_jax import cli
from ldm_jax.logs import console_logging

_WORKDIR = flags.DEFINE_string("workdir", None, "The LDM training run's workdir "
                                "(exclusive with --pipeline).")
_PIPELINE = flags.DEFINE_string("pipeline", None, "A Stable Diffusion pipeline: a diffusers "
                                "folder or a single .safetensors / .ckpt file.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "--pipeline: a CLIP tokenizer folder "
                                 "(needed by single files; replaces a folder's).")
_HEIGHT = flags.DEFINE_integer("height", None, "--pipeline: image height in pixels (default "
                               "the UNet's trained size).", lower_bound=1)
_WIDTH = flags.DEFINE_integer("width", None, "--pipeline: image width in pixels.",
                              lower_bound=1)
_STRENGTH = flags.DEFINE_float("strength", None, "--pipeline with --image: how much of the "
                               "image is repainted, in [0, 1] (default 0.8; 1 with --mask).")
_INIT_NOISE = flags.DEFINE_string("init_noise", None, "--pipeline: an .npy of the initial "
                                  "latent noise, NHWC [num, H/8, W/8, 4].")
_PREDICTION = flags.DEFINE_enum("prediction_type", None, ["eps", "v", "epsilon", "v_prediction"],
                                "--pipeline: what the UNet predicts, replacing the scheduler's "
                                "(a single file does not say: SD2-768 files need v).")
_OUT = flags.DEFINE_string("out", "samples.png", "Where to write the grid (PNG), or a "
                           "folder (an existing one, or a path ending in /) to write one "
                           "PNG per image into.")
_INDIVIDUAL = flags.DEFINE_boolean("individual", False, "Write one PNG per image into the "
                                   "folder --out (default samples/) instead of a grid.")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False,
                                  "Replace --out even when ldm_jax did not write it.")
_NUM = flags.DEFINE_integer("num", 16, "How many images.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch", 16, "Images per compiled sampling call.", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", None, "Sampler steps (default: the config's; 50 "
                              "with --pipeline).",
                              lower_bound=1)
_SAMPLER = flags.DEFINE_enum("sampler", None, list(SAMPLERS),
                             "Sampler (default: the config's).")
_ETA = flags.DEFINE_float("eta", None, "DDIM eta (default: the config's).")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (default "
                               "the config's; 7.5 with --pipeline).")
_CLASS = flags.DEFINE_integer("class_id", None, "Class id for class-conditional models.")
_PROMPT = flags.DEFINE_string("prompt", None, "Caption for text-conditional models.")
_NEGATIVE = flags.DEFINE_string("negative_prompt", None, "Used in place of the empty "
                                "caption as the unconditional side of guidance.")
_IMAGE = flags.DEFINE_string("image", None, "Super-resolution: the low-res image; inpainting: "
                             "the image to repaint; --pipeline: img2img's starting image.")
_MASK = flags.DEFINE_string("mask", None, "Inpainting: a mask of the image's size, white "
                            "where the model repaints.")
_TILE = flags.DEFINE_integer("tile", 0, "Decode in overlapping tiles of this many pixels "
                             "(a multiple of the first stage's factor; 0: whole images), "
                             "for images whose decode does not fit in memory.",
                             lower_bound=0)
_TILE_OVERLAP = flags.DEFINE_float("tile_overlap", 0.25, "Tiles' overlap, as a fraction "
                                   "of the tile.", lower_bound=0.0, upper_bound=0.5)
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the newest.")
_FIRST_STAGE = flags.DEFINE_string("first_stage", None,
                                   "The first stage's workdir or weights, when it moved "
                                   "since training (replaces config.first_stage.path).")
_VERBOSE = flags.DEFINE_boolean("verbose", False, cli.VERBOSE_HELP)
# Flags that only one of the two modes reads: naming one in the other mode is an error,
# not a silent no-op.
_WORKDIR_ONLY = (_CLASS, _STEP, _FIRST_STAGE)
_PIPELINE_ONLY = (_TOKENIZER, _HEIGHT, _WIDTH, _STRENGTH, _INIT_NOISE, _PREDICTION)


def _named(flag_list) -> list[str]:
  return [f"--{f.name}" for f in flag_list if f.present]


def _check_finite() -> None:
  """absl's float flags take nan and inf; a nan guidance samples nan latents, which decode
  to a black grid written with exit 0."""
  import math
  for flag in (_GUIDANCE, _ETA, _STRENGTH):
    if flag.value is not None and not math.isfinite(flag.value):
      raise ValueError(f"--{flag.name}={flag.value} must be a finite number")


def _check_out():
  """(--out checked, whether it is a folder of single images), before anything is built."""
  from ldm_jax import fs
  from ldm_jax.train.images import check_grid_path, check_samples_folder
  path = _OUT.value if _OUT.present or not _INDIVIDUAL.value else "samples"
  if _INDIVIDUAL.value or path.endswith("/") or fs.isdir(path):
    return check_samples_folder(path, overwrite=_OVERWRITE.value), True
  return check_grid_path(path, overwrite=_OVERWRITE.value), False


def main(argv):
  from ldm_jax.fs import configure_storage
  configure_storage()  # gs:// (and a GCS emulator) for every storage library: see ldm_jax.fs
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console_logging()
  try:
    _check_finite()
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  if _PIPELINE.value is not None:
    if _WORKDIR.value is not None:
      raise SystemExit("error: --pipeline and --workdir are exclusive: sample either a "
                       "Stable Diffusion pipeline or an LDM training run")
    return _pipeline_main()
  if _WORKDIR.value is None:
    raise SystemExit("error: give --workdir (an LDM training run) or --pipeline (a Stable "
                     "Diffusion folder or file)")
  if _named(_PIPELINE_ONLY):
    raise SystemExit(f"error: {', '.join(_named(_PIPELINE_ONLY))}: only with --pipeline")
  from ldm_jax.eval.workdir import is_ldm, load_run_config
  from ldm_jax.train import checkpoint

  workdir = _WORKDIR.value
  try:  # everything the flags name, before anything is built
    config = load_run_config(workdir, first_stage=_FIRST_STAGE.value)
    if not is_ldm(config):
      raise ValueError(f"{workdir} holds an autoencoder run, not an LDM")
    out, individual = _check_out()
    step = checkpoint.resolve_step(workdir, _STEP.value)
    if _NEGATIVE.value is not None and config.cond.kind not in ("text", "clip"):
      raise ValueError("--negative_prompt needs a text-conditional model")

  except (ValueError, FileNotFoundError) as e:
    cli.fail(e, _VERBOSE.value)
  if _GUIDANCE.value is not None and _GUIDANCE.value < 0:
    logging.warning("--guidance=%g is negative: samples are pushed away from the condition "
                    "(1 = no guidance, above 1 follows it more closely)", _GUIDANCE.value)

  import jax
  import jax.numpy as jnp
  import numpy as np
  import tqdm

  from ldm_jax.train.ldm_setup import abstract_state, tokenizer
  from ldm_jax.train.ldm_trainer import build_run, make_sampler
  from ldm_jax.train.sample_inputs import concat_fields, condition_fields

  for flag, key in ((_STEPS, "steps"), (_SAMPLER, "sampler"), (_ETA, "eta"),
                    (_GUIDANCE, "guidance_scale")):
    if flag.value is not None:
      config.sample[key] = flag.value
  try:
    fields = condition_fields(config, _NUM.value, _CLASS.value, _PROMPT.value)
    run = build_run(config, workdir, check_training_data=False)
    fields.update(concat_fields(config, run.spec, _NUM.value, _IMAGE.value, _MASK.value))
    factor = run.first_stage.spec.downsample_factor
    if _TILE.value % factor:
      raise ValueError(f"--tile={_TILE.value} must be a multiple of the first stage's "
                       f"downsampling factor {factor}")
  except (ValueError, FileNotFoundError) as e:
    cli.fail(e, _VERBOSE.value)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        abstract_state(config, run.spec, run.programs))
  state, step = checkpoint.restore_state_only(workdir, target, step)
  negative = None
  if _NEGATIVE.value is not None:
    negative = {"tokens": np.repeat(tokenizer(config)([_NEGATIVE.value]), _NUM.value, 0)}
  sampler = make_sampler(run, tile=_TILE.value, overlap=_TILE_OVERLAP.value)
  logging.info("sampling %d images from step %d: %s, %d steps, guidance %.2f", _NUM.value,
               step, config.sample.sampler, config.sample.steps, config.sample.guidance_scale)
  images, compiled = [], set()
  starts = range(0, _NUM.value, _BATCH.value)
  for i, start in enumerate(tqdm.tqdm(starts, desc="sampling", unit="batch")):
    count = min(_BATCH.value, _NUM.value - start)
    chunk = {k: jnp.asarray(v[start:start + count]) for k, v in fields.items()}
    neg = (None if negative is None else
           {k: jnp.asarray(v[start:start + count]) for k, v in negative.items()})
    key = jax.random.fold_in(jax.random.key(_SEED.value), i)
    with _compile_timer(count, compiled):
      batch = sampler(state, chunk, run.first_stage_state, key, num=count, negative=neg)
    images.append(np.asarray(batch))
  settings = dict(workdir=workdir, step=int(step), prompt=_PROMPT.value,
                  negative_prompt=_NEGATIVE.value, class_id=_CLASS.value, seed=_SEED.value,
                  sampler=config.sample.sampler, steps=int(config.sample.steps),
                  guidance=float(config.sample.guidance_scale),
                  eta=float(config.sample.get("eta", 0.0)), num=_NUM.value,
                  batch=_BATCH.value, image=_IMAGE.value, mask=_MASK.value, tile=_TILE.value)
  _write_samples(np.concatenate(images), out, settings, individual)


def _compile_timer(count: int, compiled: set):
  """Logs the sampling program's compilation: the first batch's, and the last one's when
  it holds fewer images (a new shape compiles anew)."""
  from ldm_jax.logs import compile_timer
  first = count not in compiled
  compiled.add(count)
  return compile_timer(f"the sampling program for {count} images", first=first)


def _pipeline_checks() -> dict:
  """Every --pipeline flag checked, files read, nothing built: the settings to sample."""
  from ldm_jax import fs, sd
  from ldm_jax.diffusion.samplers import SAMPLERS

  if _named(_WORKDIR_ONLY):
    raise ValueError(f"{', '.join(_named(_WORKDIR_ONLY))}: only with --workdir")
  if _PROMPT.value is None:
    raise ValueError('--pipeline needs --prompt (--prompt="" samples without a caption)')
  if not fs.exists(_PIPELINE.value):
    raise ValueError(f"--pipeline={_PIPELINE.value}: no such folder or file")
  if _TOKENIZER.value is not None and not fs.isdir(_TOKENIZER.value):
    raise ValueError(f"--tokenizer={_TOKENIZER.value} is not a folder")
  s = dict(pipeline=_PIPELINE.value, prompt=_PROMPT.value,
           negative_prompt=_NEGATIVE.value, steps=_STEPS.value or 50,
           sampler=_SAMPLER.value or "ddim",
           guidance=7.5 if _GUIDANCE.value is None else _GUIDANCE.value,
           eta=_ETA.value or 0.0, seed=_SEED.value, num=_NUM.value, batch=_BATCH.value,
           height=_HEIGHT.value, width=_WIDTH.value, strength=None, image=_IMAGE.value,
           mask=_MASK.value, init_noise=_INIT_NOISE.value, tile=_TILE.value)
  if s["eta"] and s["sampler"] != "ddim":
    raise ValueError(f"--eta applies to DDIM only; --sampler={s['sampler']} is "
                     "deterministic")
  assert s["sampler"] in SAMPLERS
  out, individual = _check_out()
  # SD's VAEs downsample 8x; the loaded pipeline's own factor is checked again below.
  for name in ("height", "width"):
    if s[name] is not None and s[name] % 8:
      raise ValueError(f"--{name}={s[name]} must be a multiple of 8 (the VAE's factor)")
  arrays, photos = {}, {}
  if _MASK.value is not None and _IMAGE.value is None:
    raise ValueError("--mask needs --image (the picture to repaint)")
  if _IMAGE.value is None:
    if _STRENGTH.value is not None:
      raise ValueError("--strength applies to img2img: give --image too")
  else:
    # Resized once the VAE's factor is known (_prepared_photos), as diffusers does.
    photos["image"] = sd.load_image(_IMAGE.value)
    default = 1.0 if _MASK.value is not None else 0.8
    s["strength"] = default if _STRENGTH.value is None else _STRENGTH.value
    sd.strength_start(s["steps"], s["strength"])  # the ValueError outside [0, 1]
    if s["sampler"] != "ddim":
      raise ValueError("img2img and inpainting start part-way along DDIM's timesteps: "
                       f"use --sampler=ddim, not {s['sampler']}")
    if _MASK.value is not None:
      mask = photos["mask"] = sd.load_image(_MASK.value)
      image = photos["image"]
      if mask.size != image.size:  # diffusers would stretch it; more likely a wrong file
        raise ValueError(f"--mask is {mask.width}x{mask.height}; the image is "
                         f"{image.width}x{image.height}")
  if _INIT_NOISE.value is not None:
    import numpy as np
    if not fs.isfile(_INIT_NOISE.value):
      raise ValueError(f"--init_noise={_INIT_NOISE.value} not found")
    try:
      with fs.open(_INIT_NOISE.value, "rb") as f:
        noise = np.load(f, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise ValueError(f"cannot read --init_noise={_INIT_NOISE.value} as .npy: {e}") from None
    if noise.ndim != 4 or len(noise) != s["num"]:
      raise ValueError(f"--init_noise holds shape {noise.shape}; it needs one NHWC latent "
                       f"per image: [{s['num']}, H/8, W/8, channels]")
    arrays["init_noise"] = noise.astype(np.float32)
  if s["guidance"] < 0:
    logging.warning("--guidance=%g is negative: samples are pushed away from the prompt",
                    s["guidance"])
  return {"settings": s, "arrays": arrays, "photos": photos, "out": out,
          "individual": individual}


def _prepared_photos(photos: dict, settings: dict, factor: int) -> dict:
  """--image / --mask as the pipeline takes them, resized as diffusers' VaeImageProcessor
  does: to --height / --width, or to the photo's size rounded down to a multiple of the
  VAE's factor (diffusers' inpainting pipeline defaults to the UNet's size instead)."""
  from ldm_jax import sd
  if "image" not in photos:
    return {}
  image = photos["image"]
  size = sd.processed_size(image, factor, settings["height"], settings["width"])
  if size != (image.height, image.width):
    logging.info("--image is %dx%d: resized to %dx%d (Lanczos, as diffusers)", image.width,
                 image.height, size[1], size[0])
  arrays = {"image": sd.prepare_image(image, factor, *size)[None]}
  if "mask" in photos:
    arrays["mask"] = sd.prepare_mask(photos["mask"], factor, *size)[None]
  return arrays


def _pipeline_main():
  try:
    checked = _pipeline_checks()
  except ValueError as e:  # OutputError is one
    cli.fail(e, _VERBOSE.value)
  s, arrays, out = checked["settings"], checked["arrays"], checked["out"]
  kind = ("inpaint" if "mask" in checked["photos"] else
          "img2img" if "image" in checked["photos"] else "txt2img")

  import jax
  import numpy as np
  import tqdm

  from ldm_jax import sd
  from ldm_jax.convert.pipeline import load_pipeline

  try:
    pipe = load_pipeline(s["pipeline"], tokenizer=_TOKENIZER.value,
                         prediction_type=_PREDICTION.value)
    if kind == "inpaint" and not pipe.is_inpaint:
      raise ValueError(f"--mask needs an inpainting pipeline; {s['pipeline']} is "
                       f"{pipe.variant} with a {pipe.unet.spec.in_channels}-channel UNet")
    if pipe.is_inpaint and kind != "inpaint":
      raise ValueError(f"{s['pipeline']} is an inpainting pipeline: give --image and --mask")
    f = pipe.vae_factor
    arrays.update(_prepared_photos(checked["photos"], s, f))
    if "image" in arrays:
      size = arrays["image"].shape[1:3]
    else:
      size = sd.image_size(pipe, s["height"], s["width"])
    if size[0] % f or size[1] % f:
      raise ValueError(f"the images' size {size[1]}x{size[0]} must be a multiple of the "
                       f"VAE's factor {f}")
    if s["tile"] % f:
      raise ValueError(f"--tile={s['tile']} must be a multiple of the VAE's factor {f}")
    latent = (s["num"], size[0] // f, size[1] // f, pipe.latent_channels)
    if "init_noise" in arrays and arrays["init_noise"].shape != latent:
      raise ValueError(f"--init_noise holds shape {arrays['init_noise'].shape}; these "
                       f"images need {latent}")
  except (ValueError, FileNotFoundError) as e:
    cli.fail(e, _VERBOSE.value)

  s["height"], s["width"] = (int(v) for v in size)  # the settings that reproduce it
  common = dict(negative_prompt=s["negative_prompt"], steps=s["steps"],
                guidance=s["guidance"], eta=s["eta"], tile=s["tile"],
                tile_overlap=_TILE_OVERLAP.value)
  logging.info("%s: %d images of %dx%d, %s %d steps, guidance %.2f", kind, s["num"], size[1],
               size[0], s["sampler"], s["steps"], s["guidance"])
  images, compiled = [], set()
  starts = range(0, s["num"], s["batch"])
  for i, start in enumerate(tqdm.tqdm(starts, desc="sampling", unit="batch")):
    count = min(s["batch"], s["num"] - start)
    noise = arrays.get("init_noise")
    # Batch i draws from fold_in(key(seed), i): more batches never change earlier ones.
    key = jax.random.fold_in(jax.random.key(s["seed"]), i)
    args = dict(common, num=count, seed=key,
                init_noise=None if noise is None else noise[start:start + count])
    with _compile_timer(count, compiled):
      if kind == "txt2img":
        batch = sd.txt2img(pipe, s["prompt"], height=size[0], width=size[1],
                           sampler=s["sampler"], **args)
      elif kind == "img2img":
        batch = sd.img2img(pipe, arrays["image"], s["prompt"], s["strength"], **args)
      else:
        batch = sd.inpaint(pipe, arrays["image"], arrays["mask"], s["prompt"],
                           strength=s["strength"], **args)
    images.append(np.asarray(batch))
  _write_samples(np.concatenate(images), out, s, checked["individual"])


def _png_info(settings: dict, index: int | None = None):
  """The PNG text chunk: the ldm_jax marker, the prompt and every setting (JSON, with the
  image's index for a single image: batch index // batch drew it from fold_in(seed, i)),
  so that a file says how to sample it again."""
  import json

  from PIL import PngImagePlugin

  from ldm_jax import outputs
  info = PngImagePlugin.PngInfo()
  info.add_text(outputs.MARKER_KEY, outputs.SAMPLES)
  for key in ("prompt", "negative_prompt"):
    if settings.get(key) is not None:
      info.add_text(key, settings[key])
  if index is not None:
    settings = {**settings, "index": index}
  info.add_text("ldm_jax_settings", json.dumps(settings, sort_keys=True))
  return info


def _write_samples(images, path: str, settings: dict, individual: bool) -> None:
  """images [N, H, W, 3] in [-1, 1]: one grid PNG at `path`, or (individual) a folder
  `path` of 00000.png, 00001.png, ..., written whole (a rerun replaces the folder)."""
  from PIL import Image

  from ldm_jax import outputs
  from ldm_jax.train.images import grid, to_uint8
  with outputs.atomic_path(path, outputs.SAMPLES, overwrite=_OVERWRITE.value) as tmp:
    if individual:
      tmp.mkdir()
      for i, image in enumerate(to_uint8(images)):
        Image.fromarray(image).save(tmp / f"{i:05d}.png", format="PNG",
                                    pnginfo=_png_info(settings, i))
    else:
      Image.fromarray(grid(images)).save(tmp, format="PNG", pnginfo=_png_info(settings))
  logging.info("wrote %s%s", path, f" ({len(images)} images)" if individual else "")


if __name__ == "__main__":
  cli.run(main, _VERBOSE)
