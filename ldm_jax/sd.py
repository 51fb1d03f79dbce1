"""Stable Diffusion 1.x / 2.x in ldm_jax: a loaded pipeline and what samples from it.

A `Pipeline` is what a diffusers pipeline folder or an SD single-file checkpoint holds,
as ldm_jax modules: the UNet, the VAE with its latent scale (and shift), the CLIP /
OpenCLIP text encoder, its tokenizer, and the noise schedule with its prediction type.
`ldm_jax.convert.pipeline` reads and writes them; the functions below sample:

  txt2img(pipe, "a photo of a cat", steps=50, guidance=7.5, seed=0)   [N, H, W, 3] in [-1, 1]
  img2img(pipe, image, prompt, strength=0.8)        SDEdit, as StableDiffusionImg2ImgPipeline
  inpaint(pipe, image, mask, prompt)                9-channel UNets, as ...InpaintPipeline

A photo becomes `image` as diffusers prepares it: prepare_image(load_image(path),
pipe.vae_factor) (and prepare_mask for the mask).

DDIM is diffusers' DDIMScheduler with the pipeline's scheduler settings (spacing "leading",
"trailing" or "linspace", steps_offset, set_alpha_to_one, clip_sample): given the same
initial noise the images are diffusers' (tests/test_sd_sampling.py). plms / dpmpp_2m /
ddpm (txt2img only) are ldm_jax's samplers on the pipeline's betas, with their own
timesteps (diffusion/samplers.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ldm_jax.diffusion import samplers
from ldm_jax.diffusion.schedules import Schedule, beta_schedule, to_eps_x0
from ldm_jax.train import first_stage

# diffusers' beta_schedule names -> ldm_jax's (schedules.beta_schedule): SD's
# "scaled_linear" is linear in sqrt(beta), which CompVis calls "linear".
BETA_SCHEDULES = {"scaled_linear": "linear", "linear": "sqrt_linear"}
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
  """The fields of a diffusers `scheduler_config.json` that change the numbers (SD1 / SD2
  defaults); `extra` keeps the rest so a saved pipeline writes them back."""

  num_train_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  beta_schedule: str = "scaled_linear"
  prediction_type: str = "epsilon"
  timestep_spacing: str = "leading"
  steps_offset: int = 1
  set_alpha_to_one: bool = False
  clip_sample: bool = False
  extra: tuple[tuple[str, Any], ...] = ()

  def __post_init__(self):
    if self.beta_schedule not in BETA_SCHEDULES:
      raise ValueError(f"scheduler beta_schedule={self.beta_schedule!r} is not supported; "
                       f"choose one of {sorted(BETA_SCHEDULES)}")
    if self.prediction_type not in PREDICTION_TYPES:
      raise ValueError(f"scheduler prediction_type={self.prediction_type!r} is not "
                       f"supported; choose one of {sorted(PREDICTION_TYPES)}")

  @property
  def schedule(self) -> Schedule:
    return Schedule(beta_schedule(BETA_SCHEDULES[self.beta_schedule], self.num_train_timesteps,
                                  self.beta_start, self.beta_end))

  @property
  def parameterization(self) -> str:
    """ldm_jax's name for the prediction type: "eps", "v" or "x0"."""
    return PREDICTION_TYPES[self.prediction_type]


@dataclasses.dataclass
class Pipeline:
  """A Stable Diffusion checkpoint as ldm_jax modules (see the module docstring).

  `variant` says what was read: "sd1" (CLIP ViT-L/14 text, last layer), "sd2" (OpenCLIP
  ViT-H/14 text, penultimate layer), with "-inpaint" when the UNet takes 9 channels.
  Latents are `(z - latent_shift) * latent_scale`, as `first_stage.normalize`.
  """

  unet: Any  # models.unet.UNetModel
  vae: Any  # models.autoencoder.AutoencoderKL
  text_encoder: Any  # models.clip.CLIPTextTransformer
  tokenizer: Any  # data.tokenizer.CLIPTokenizer
  scheduler: SchedulerConfig
  latent_scale: float = 0.18215
  latent_shift: float = 0.0
  variant: str = "sd1"
  sample_size: int = 64  # the UNet's trained latent size (64 for 512 px, 96 for 768 px)

  @property
  def latent_norm(self) -> tuple[float, float]:
    """(scale, shift) as `train.first_stage.normalize` takes them."""
    return (self.latent_scale, self.latent_shift)

  @property
  def is_inpaint(self) -> bool:
    """The UNet takes [latents, mask, masked-image latents] (9 channels for SD)."""
    return self.unet.spec.in_channels != self.unet.spec.out_channels

  @property
  def latent_channels(self) -> int:
    return int(self.unet.spec.out_channels)

  @property
  def vae_factor(self) -> int:
    return int(self.vae.spec.downsample_factor)

  @property
  def default_size(self) -> int:
    """Pixels per side the UNet was trained at (512 for SD1, 768 for SD2-v)."""
    return self.sample_size * self.vae_factor


# ----------------------------------------------------------------------------------------
# Sampling. Every public function below runs one jitted program (`_program`): text encoding,
# the whole sampling loop (lax.scan), and the VAE's encode / decode. jax.jit keys its cache
# on the static plan and the input shapes, so a second call with the same settings and
# sizes reuses the compiled program.

def encode_prompt(pipeline: Pipeline, prompts: str | Sequence[str]) -> jax.Array:
  """Cross-attention context [N, L, D] for `prompts` (a string or a list of them)."""
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  ids = jnp.asarray(pipeline.tokenizer(prompts))
  return _encode_text(nnx.graphdef(pipeline.text_encoder), nnx.state(pipeline.text_encoder),
                      ids)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _encode_text(graphdef, state, ids):
  return nnx.merge(graphdef, state)(ids)


def ddim_schedule(scheduler: SchedulerConfig, steps: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(timesteps, alphas_cumprod at them, alphas_cumprod of each step's target), in sampling
  (descending) order, as diffusers' DDIMScheduler `set_timesteps` and `step` compute them.

  diffusers takes each step's previous timestep as `t - T // steps` whatever the spacing,
  not the next entry of the list: for "linspace" the two differ, and matching diffusers
  means keeping its rule. For SD's settings ("leading", steps_offset 1, set_alpha_to_one
  False) this is `samplers.ddim`'s "uniform" table.
  """
  total = scheduler.num_train_timesteps
  if not 1 <= steps <= total:
    raise ValueError(f"steps={steps} must be between 1 and the scheduler's {total} "
                     "training timesteps")
  spacing = scheduler.timestep_spacing
  if spacing == "leading":
    ts = np.arange(steps)[::-1] * (total // steps) + scheduler.steps_offset
  elif spacing == "trailing":
    ts = np.round(np.arange(total, 0, -total / steps)).astype(np.int64) - 1
  elif spacing == "linspace":
    ts = np.linspace(0, total - 1, steps).round()[::-1].astype(np.int64)
  else:
    raise ValueError(f"scheduler timestep_spacing={spacing!r} is not supported; choose "
                     "'leading', 'trailing' or 'linspace'")
  if len(ts) != steps or ts.max() >= total or ts.min() < 0:
    raise ValueError(f"{steps} steps with {spacing!r} spacing and steps_offset="
                     f"{scheduler.steps_offset} give timesteps outside [0, {total}): "
                     "use fewer steps")
  ab = scheduler.schedule.alphas_cumprod
  prev = ts - total // steps
  final = 1.0 if scheduler.set_alpha_to_one else ab[0]
  return ts.astype(np.int64), ab[ts], np.where(prev >= 0, ab[np.maximum(prev, 0)], final)


def strength_start(steps: int, strength: float) -> int:
  """Index into the descending DDIM timesteps where SDEdit starts: diffusers' img2img runs
  the last int(steps * strength) steps."""
  if not np.isfinite(strength):
    raise ValueError(f"strength={strength} must be a finite number in [0, 1]")
  if not 0.0 <= strength <= 1.0:
    raise ValueError(f"strength={strength} must lie in [0, 1] (0 keeps the image, 1 "
                     "repaints it from almost pure noise)")
  return steps - min(int(steps * strength), steps)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Everything static about one sampling program (hashable: a jit cache key)."""

  sampler: str
  steps: int
  guidance: float  # static: samplers.guided branches on it (a new scale compiles anew)
  eta: float
  clip: float | None  # diffusers' clip_sample_range when clip_sample is on
  # The scheduler as hashable numbers (SchedulerConfig.extra may hold lists).
  schedule: tuple  # (beta_schedule, T, beta_start, beta_end, spacing, offset, alpha_to_one)
  parameterization: str
  latent_norm: tuple[float, float]
  # "noise": start from the noise (txt2img, inpainting at strength 1); "image": from the
  # image's latents noised to the traced inputs["start"] (img2img).
  source: str
  inpaint: bool
  decode: bool  # False: return latents (a tiled decode follows outside the program)

  @property
  def scheduler(self) -> SchedulerConfig:
    kind, total, start, end, spacing, offset, to_one = self.schedule
    return SchedulerConfig(num_train_timesteps=total, beta_start=start, beta_end=end,
                           beta_schedule=kind, timestep_spacing=spacing, steps_offset=offset,
                           set_alpha_to_one=to_one)


def _ddim_loop(model_fn, x, plan: _Plan, key, start=None):
  """diffusers' DDIM steps from index `start` (traced: one program serves every img2img
  strength; the skipped steps pass x through a lax.cond, so they cost no UNet call)."""
  ts, a, a_prev = ddim_schedule(plan.scheduler, plan.steps)
  sigma = plan.eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
  table = [jnp.arange(plan.steps, dtype=jnp.int32), jnp.asarray(ts, jnp.int32)] + [
      jnp.asarray(v, jnp.float32) for v in (a, a_prev, sigma)]
  keys = jax.random.split(key, plan.steps)

  def step(x, inputs):
    t, a, a_prev, sigma, step_key = inputs
    eps, x0 = to_eps_x0(plan.parameterization,
                        model_fn(x, jnp.full((x.shape[0],), t, jnp.int32)), x, a)
    if plan.clip is not None:  # diffusers clips x0 only; eps stays the model's
      x0 = jnp.clip(x0, -plan.clip, plan.clip)
    x_prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev - sigma**2) * eps
    if plan.eta > 0:
      x_prev = x_prev + sigma * jax.random.normal(step_key, x.shape, x.dtype)
    return x_prev

  def body(x, inputs):
    i, *rest = inputs
    if start is None:
      return step(x, rest), None
    return jax.lax.cond(i >= start, step, lambda x, _: x, x, rest), None

  x, _ = jax.lax.scan(body, x, (*table, keys))
  return x


def _latents(vae, image, posterior_noise, latent_norm):
  """Normalized latents of `image`: the posterior mean, or a posterior sample when
  `posterior_noise` (standard normal, latent-shaped) is given."""
  posterior = vae.encode(image)
  z = posterior.mean if posterior_noise is None else (posterior.mean +
                                                       posterior.std * posterior_noise)
  return first_stage.normalize(z, latent_norm)


@functools.partial(jax.jit, static_argnames=("defs", "plan"))
def _program(defs, plan: _Plan, states, inputs: dict, key):
  unet, vae, text = (nnx.merge(d, s) for d, s in zip(defs, states))
  cond = {"context": text(inputs["ids"])}
  guided = plan.guidance != 1.0
  uncond = {"context": text(inputs["uncond_ids"])} if guided else None
  x = inputs["noise"]
  noise_key = jax.random.fold_in(key, 1)
  if plan.inpaint:
    # diffusers' inpainting: binary mask (>= 0.5 repaints), the image with the repainted
    # part zeroed, and the mask taken at every f-th pixel (torch's nearest resize).
    mask = (inputs["mask"] >= 0.5).astype(jnp.float32)
    f = inputs["image"].shape[1] // x.shape[1]
    masked = _latents(vae, inputs["image"] * (1.0 - mask), inputs.get("posterior_noise"),
                      plan.latent_norm)
    concat = jnp.concatenate([mask[:, ::f, ::f], masked], axis=-1)
    cond["concat"] = concat
    if guided:
      uncond["concat"] = concat
  if plan.source == "image":
    z = _latents(vae, inputs["image"], None if plan.inpaint else
                 inputs.get("posterior_noise"), plan.latent_norm)
    _, ab, _ = ddim_schedule(plan.scheduler, plan.steps)
    # SDEdit: the image's latents noised to the first timestep left to run; none at
    # strength 0 (start == steps), where the image is only encoded and decoded.
    start = inputs["start"]
    alpha_bar = jnp.asarray(np.append(ab, 1.0), jnp.float32)[start]
    x = jnp.sqrt(alpha_bar) * z + jnp.sqrt(1.0 - alpha_bar) * x

  def denoise(x, t, c):
    h = x if "concat" not in c else jnp.concatenate([x, c["concat"]], axis=-1)
    return unet(h, t, context=c["context"]).astype(jnp.float32)

  fn = samplers.guided(denoise, cond, uncond, plan.guidance)
  if plan.sampler == "ddim":
    x = _ddim_loop(fn, x, plan, noise_key, inputs.get("start"))
  else:
    x = samplers.sample(plan.sampler, fn, x, plan.scheduler.schedule, plan.steps,
                        parameterization=plan.parameterization, key=noise_key)
  z = first_stage.denormalize(x, plan.latent_norm)
  return jnp.clip(vae.decode(z).astype(jnp.float32), -1.0, 1.0) if plan.decode else z


def _check_finite(**values) -> None:
  """A nan or inf guidance / eta makes nan latents, which decode to black images with no
  error anywhere: refused up front."""
  for name, value in values.items():
    if not np.isfinite(value):
      raise ValueError(f"{name}={value} must be a finite number")


def _prompts(prompt, num: int) -> list[str]:
  prompts = [prompt] if isinstance(prompt, str) else list(prompt)
  if not prompts or not all(isinstance(p, str) for p in prompts):
    raise ValueError("prompt must be a string or a non-empty list of strings")
  if num < 1:
    raise ValueError(f"num={num} must be >= 1")
  # Each prompt's images next to each other, as diffusers' num_images_per_prompt.
  return [p for p in prompts for _ in range(num)]


def _noise(key, shape, init_noise):
  if init_noise is None:
    return jax.random.normal(jax.random.fold_in(key, 0), shape, jnp.float32)
  init_noise = jnp.asarray(init_noise, jnp.float32)
  if init_noise.shape != shape:
    raise ValueError(f"init_noise has shape {tuple(init_noise.shape)}; these images need "
                     f"NHWC latent noise of shape {shape} (a diffusers latents= array is "
                     "NCHW: transpose it with (0, 2, 3, 1))")
  return init_noise


def _key(seed):
  return jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed


def _run(pipeline: Pipeline, prompts: list[str], negative_prompt, noise, *, sampler, steps,
         guidance, eta, key, start=0, source="noise", image=None, mask=None,
         posterior_noise=None, tile=0, tile_overlap=0.25):
  if sampler not in samplers.SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {samplers.SAMPLERS}")
  if eta != 0 and sampler != "ddim":
    raise ValueError(f"eta={eta} applies to DDIM only; {sampler!r} is deterministic")
  if sampler != "ddim" and source == "image":
    raise ValueError("img2img (and inpainting below strength 1) start part-way along "
                     f"DDIM's timesteps; sampler={sampler!r} cannot: use sampler='ddim'")
  s = pipeline.scheduler
  if sampler == "ddim":
    ddim_schedule(s, steps)  # the settings' errors now, not inside the trace
  clip = None
  if s.clip_sample:
    clip = float(dict(s.extra).get("clip_sample_range", 1.0))
  if dict(s.extra).get("thresholding"):
    raise ValueError("scheduler thresholding=True (dynamic thresholding) is not supported")
  # CompVis' txt2img guides whenever the scale is not 1 (diffusers only above 1).
  guided = float(guidance) != 1.0
  n = len(prompts)
  if negative_prompt is None:
    negatives = [""] * n
  else:
    negatives = _prompts(negative_prompt, 1)
    if len(negatives) == 1:
      negatives = negatives * n
    elif len(negatives) * (n // len(negatives)) == n:
      negatives = [p for p in negatives for _ in range(n // len(negatives))]
    else:
      raise ValueError(f"{len(negatives)} negative prompts for {n} images")
  inputs = {"ids": jnp.asarray(pipeline.tokenizer(prompts)), "noise": noise}
  if guided:
    inputs["uncond_ids"] = jnp.asarray(pipeline.tokenizer(negatives))
  if image is not None:
    inputs["image"] = jnp.asarray(image, jnp.float32)
  if mask is not None:
    inputs["mask"] = jnp.asarray(mask, jnp.float32)
  if source == "image":
    inputs["start"] = jnp.int32(start)
  if posterior_noise is not None:
    inputs["posterior_noise"] = _noise(None, noise.shape, posterior_noise)
  plan = _Plan(sampler=sampler, steps=int(steps), guidance=float(guidance),
               eta=float(eta), clip=clip,
               schedule=(s.beta_schedule, s.num_train_timesteps, s.beta_start, s.beta_end,
                         s.timestep_spacing, s.steps_offset, s.set_alpha_to_one),
               parameterization=s.parameterization,
               latent_norm=tuple(map(float, pipeline.latent_norm)), source=source,
               inpaint=mask is not None, decode=not tile)
  modules = (pipeline.unet, pipeline.vae, pipeline.text_encoder)
  defs = tuple(nnx.graphdef(m) for m in modules)
  states = tuple(nnx.state(m) for m in modules)
  out = _program(defs, plan, states, inputs, key)
  if not tile:
    return out
  from ldm_jax.models.tiling import tiled_decode
  return jnp.clip(tiled_decode(pipeline.vae, out, tile, tile_overlap), -1.0, 1.0)


def image_size(pipeline: Pipeline, height=None, width=None) -> tuple[int, int]:
  """(height, width) in pixels, checked; None means the UNet's trained size."""
  height = pipeline.default_size if height is None else int(height)
  width = pipeline.default_size if width is None else int(width)
  f = pipeline.vae_factor
  if height <= 0 or width <= 0 or height % f or width % f:
    raise ValueError(f"height={height} and width={width} must be positive multiples of "
                     f"the VAE's downsampling factor {f}")
  return height, width


# ----------------------------------------------------------------------------------------
# Input photos as diffusers prepares them: `diffusers.utils.load_image` (EXIF rotation, RGB),
# then the pipelines' VaeImageProcessor (the size rounded down to a multiple of the VAE's
# factor, a Lanczos resize). The arrays below are what img2img / inpaint take.

def load_image(path_or_image):
  """A PIL image, EXIF-rotated and RGB, as `diffusers.utils.load_image` gives it; from a
  path (local or gs://) or a PIL image."""
  from PIL import Image, ImageOps

  from ldm_jax import fs
  if isinstance(path_or_image, Image.Image):
    image = path_or_image
  else:
    path = str(path_or_image)
    if not fs.isfile(path):
      raise ValueError(f"{path} not found")
    try:
      with fs.open(path, "rb") as f, Image.open(f) as opened:
        opened.load()
        image = opened.copy()
    except OSError as e:
      raise ValueError(f"cannot read {path} as an image: {e}") from None
  return ImageOps.exif_transpose(image).convert("RGB")


def processed_size(image, factor: int, height: int | None = None,
                   width: int | None = None) -> tuple[int, int]:
  """(height, width) that VaeImageProcessor.get_default_height_width gives a PIL image:
  the given size or the image's own, each rounded down to a multiple of `factor`."""
  height = image.height if height is None else int(height)
  width = image.width if width is None else int(width)
  height, width = height - height % factor, width - width % factor
  if height < factor or width < factor:
    raise ValueError(f"the image is {image.width}x{image.height}: at least {factor} pixels "
                     f"a side are needed (the VAE's factor)")
  return height, width


def _resized(image, factor, height, width):
  from PIL import Image
  size = processed_size(image, factor, height, width)
  # PIL returns a copy when the size is unchanged, as diffusers' resize does.
  return image.resize((size[1], size[0]), resample=Image.Resampling.LANCZOS)


def prepare_image(image, factor: int, height: int | None = None,
                  width: int | None = None) -> np.ndarray:
  """[H, W, 3] float32 in [-1, 1]: `VaeImageProcessor(vae_scale_factor=factor)
  .preprocess(image, height, width)` for one PIL image (from `load_image`)."""
  pixels = np.asarray(_resized(image, factor, height, width), np.float32) / 255.0
  return 2.0 * pixels - 1.0


def prepare_mask(mask, factor: int, height: int | None = None,
                 width: int | None = None) -> np.ndarray:
  """[H, W] float32 in [0, 1]: the inpainting pipelines' mask processor (the same resize,
  then grayscale; no normalization) for one PIL image. Its binarization at 0.5 happens
  in `inpaint`."""
  resized = _resized(mask, factor, height, width).convert("L")
  return np.asarray(resized, np.float32) / 255.0


def _images(image, name: str = "image") -> np.ndarray:
  image = np.asarray(image, np.float32)
  if image.ndim == 3:
    image = image[None]
  if image.ndim != 4 or image.shape[-1] != 3:
    raise ValueError(f"{name} must be [N, H, W, 3] (or [H, W, 3]) in [-1, 1], got shape "
                     f"{image.shape}")
  return image


def txt2img(pipeline: Pipeline, prompt: str | Sequence[str], *, negative_prompt=None,
            height: int | None = None, width: int | None = None, steps: int = 50,
            sampler: str = "ddim", guidance: float = 7.5, seed: int | jax.Array = 0,
            num: int = 1, init_noise=None, eta: float = 0.0, tile: int = 0,
            tile_overlap: float = 0.25) -> jax.Array:
  """Images [len(prompts) * num, H, W, 3] in [-1, 1] (clipped), `num` per prompt.

  DDIM follows diffusers' DDIMScheduler with the pipeline's scheduler settings, so given
  the same `init_noise` (NHWC; diffusers' `latents=` transposed) the images are diffusers'
  StableDiffusionPipeline's. Without it the noise comes from `seed` (an int or a JAX key).
  `guidance` != 1 guides away from `negative_prompt` (default the empty prompt). `tile`
  decodes in overlapping tiles of that many pixels (models.tiling).
  """
  _check_finite(guidance=guidance, eta=eta)
  prompts = _prompts(prompt, num)
  height, width = image_size(pipeline, height, width)
  f = pipeline.vae_factor
  key = _key(seed)
  noise = _noise(key, (len(prompts), height // f, width // f, pipeline.latent_channels),
                 init_noise)
  if pipeline.is_inpaint:
    raise ValueError("this is an inpainting pipeline: sample it with inpaint(image, mask)")
  return _run(pipeline, prompts, negative_prompt, noise, sampler=sampler, steps=steps,
              guidance=guidance, eta=eta, key=key, tile=tile, tile_overlap=tile_overlap)


def img2img(pipeline: Pipeline, image, prompt: str | Sequence[str], strength: float = 0.8,
            *, negative_prompt=None, steps: int = 50, guidance: float = 7.5,
            seed: int | jax.Array = 0, num: int = 1, init_noise=None, posterior_noise=None,
            eta: float = 0.0, tile: int = 0, tile_overlap: float = 0.25) -> jax.Array:
  """SDEdit as diffusers' StableDiffusionImg2ImgPipeline: `image` [N, H, W, 3] in [-1, 1]
  (one per prompt, or one for all) is encoded, noised to the timestep where the last
  int(steps * strength) DDIM steps begin, and denoised over them.

  The latent is the VAE posterior's mean, so the result depends on `seed` only through
  the added noise (and strength 0 returns decode(encode(image))). diffusers samples the
  posterior with its generator instead; pass that draw as `posterior_noise` (NHWC) and
  the added noise as `init_noise` to reproduce it.
  """
  if pipeline.is_inpaint:
    raise ValueError("this is an inpainting pipeline: sample it with inpaint(image, mask)")
  _check_finite(guidance=guidance, eta=eta)
  start = strength_start(steps, strength)
  prompts = _prompts(prompt, num)
  image = _batch_images(_images(image), len(prompts), pipeline)
  f = pipeline.vae_factor
  key = _key(seed)
  noise = _noise(key, (len(prompts), image.shape[1] // f, image.shape[2] // f,
                       pipeline.latent_channels), init_noise)
  return _run(pipeline, prompts, negative_prompt, noise, sampler="ddim", steps=steps,
              guidance=guidance, eta=eta, key=key, start=start, source="image", image=image,
              posterior_noise=posterior_noise, tile=tile, tile_overlap=tile_overlap)


def inpaint(pipeline: Pipeline, image, mask, prompt: str | Sequence[str], *,
            strength: float = 1.0, negative_prompt=None, steps: int = 50,
            guidance: float = 7.5, seed: int | jax.Array = 0, num: int = 1,
            init_noise=None, posterior_noise=None, eta: float = 0.0, tile: int = 0,
            tile_overlap: float = 0.25) -> jax.Array:
  """Inpainting with a 9-channel UNet, as diffusers' StableDiffusionInpaintPipeline:
  `mask` [N, H, W] (or [N, H, W, 1]) in [0, 1], >= 0.5 where the model repaints. Each
  step the UNet sees [latents, mask at latent size, latents of the image with the
  repainted part zeroed]. At strength 1 sampling starts from pure noise (as diffusers);
  below 1 from the image's latents (posterior mean) noised as in `img2img`.

  The masked image's latent is the posterior mean, or mean + std * `posterior_noise`
  (diffusers' generator draw, for parity).
  """
  if not pipeline.is_inpaint:
    raise ValueError("inpaint needs an inpainting pipeline (a UNet taking latents, mask "
                     "and masked-image latents: 9 input channels for SD)")
  _check_finite(guidance=guidance, eta=eta)
  start = strength_start(steps, strength)
  prompts = _prompts(prompt, num)
  image = _batch_images(_images(image), len(prompts), pipeline)
  mask = np.asarray(mask, np.float32)
  if mask.ndim == 2:
    mask = mask[None]
  if mask.ndim == 3:
    mask = mask[..., None]
  if mask.ndim != 4 or mask.shape[-1] != 1 or mask.shape[1:3] != image.shape[1:3]:
    raise ValueError(f"mask must be [N, H, W] with the image's size {image.shape[1:3]}, "
                     f"got shape {mask.shape}")
  mask = np.broadcast_to(mask, image.shape[:3] + (1,)) if len(mask) == 1 else mask
  if len(mask) != len(image):
    raise ValueError(f"{len(mask)} masks for {len(image)} images")
  f = pipeline.vae_factor
  key = _key(seed)
  noise = _noise(key, (len(prompts), image.shape[1] // f, image.shape[2] // f,
                       pipeline.latent_channels), init_noise)
  return _run(pipeline, prompts, negative_prompt, noise, sampler="ddim", steps=steps,
              guidance=guidance, eta=eta, key=key, start=start,
              source="noise" if start == 0 else "image", image=image, mask=mask,
              posterior_noise=posterior_noise, tile=tile, tile_overlap=tile_overlap)


def _batch_images(image: np.ndarray, n: int, pipeline: Pipeline) -> np.ndarray:
  f = pipeline.vae_factor
  if image.shape[1] % f or image.shape[2] % f:
    raise ValueError(f"the image's size {image.shape[1]}x{image.shape[2]} must be a "
                     f"multiple of the VAE's downsampling factor {f}")
  if len(image) == 1:
    return np.broadcast_to(image, (n,) + image.shape[1:])
  if n % len(image):
    raise ValueError(f"{len(image)} images for {n} outputs")
  return np.repeat(image, n // len(image), axis=0)
