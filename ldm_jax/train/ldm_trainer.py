"""LDM training: `train_and_evaluate(config, workdir)` for configs with stage == "ldm".

Same machinery as the first stage: config and data checked before compiling, a (data,
fsdp) mesh, orbax checkpoints with the data iterator, resume, SIGTERM, clu writers. The
frozen autoencoder encodes each batch (or a latent cache is read instead); scale_by_std
sets the latent scale from the first batch of a fresh run and the checkpoint keeps it.
Every `sample.every` steps a grid of samples (EMA weights, the config's sampler and
guidance) goes to TensorBoard and `workdir/images/`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ldm_jax import fs
from ldm_jax.data.latents import latent_iterator
from ldm_jax.data.pipeline import train_iterator
from ldm_jax.data.sources import check_data
from ldm_jax.data.spec import DataSpec
from ldm_jax.diffusion import samplers
from ldm_jax.train import first_stage, ldm_step, sd_source
from ldm_jax.train import concat as concat_lib
from ldm_jax import mesh as mesh_lib
from ldm_jax.train import loop
from ldm_jax.train.guard import NonFiniteError
from ldm_jax.train.images import grid, save_grid
from ldm_jax.train.ldm_setup import build_model, build_programs, check_config, condition_spec
from ldm_jax.train.optim import learning_rate


@dataclasses.dataclass
class LDMRun:
  config: ml_collections.ConfigDict
  workdir: str
  data: DataSpec  # config.data, read once here; the data functions take this
  spec: Any
  programs: ldm_step.LDMPrograms
  layout: mesh_lib.Layout  # the mesh and the sharding rules (train.mesh, train.sharding_rules)
  first_stage: Any  # the frozen autoencoder module
  first_stage_state: Any
  global_batch: int

  @property
  def mesh(self):
    return self.layout.mesh


def build_run(config: ml_collections.ConfigDict, workdir: str,
              check_training_data: bool = True) -> LDMRun:
  """Loads and checks everything; nothing is compiled yet."""
  config = sd_source.resolve(config)  # an SD config's first stage numbers: the pipeline's
  check_config(config)  # the config alone first: its errors before any data or weights
  data = DataSpec.from_config(config.data)
  if check_training_data and not config.first_stage.cache_dir:
    check_data(data, conditions=condition_spec(config))  # its captions / labels too
  layout = mesh_lib.Layout.from_config(config.train)
  global_batch = data.batch_size
  mesh_lib.check_batch(global_batch, layout.mesh)
  if sd_source.is_sd(config):
    autoencoder = sd_source.load(config).vae  # the pipeline's VAE is the first stage
  else:
    autoencoder = _load_first_stage(config)
  fs_def, fs_state = nnx.split(autoencoder)
  spec, programs = build_programs(config, fs_def)
  latent_channels = autoencoder.spec.embed_dim
  extra = programs.concat.channels(latent_channels)
  if spec.in_channels != latent_channels + extra:
    with_concat = (f" plus {extra} concatenated ({programs.concat.kind})" if extra else "")
    raise ValueError(f"unet.in_channels={spec.in_channels} but the first stage's latents have "
                     f"{latent_channels} channels{with_concat}: set unet.in_channels="
                     f"{latent_channels + extra}")
  if spec.out_channels != latent_channels:
    raise ValueError(f"unet.out_channels={spec.out_channels} but the first stage's latents "
                     f"have {latent_channels} channels")
  return LDMRun(config, workdir, data, spec, programs, layout, autoencoder, fs_state, global_batch)


def _load_first_stage(config: ml_collections.ConfigDict):
  if not config.first_stage.path:
    raise ValueError("set first_stage.path: the autoencoder that made (or decodes) the "
                     "latents, an ldm_jax workdir or PyTorch weights")
  source = str(config.first_stage.path)
  if not fs.exists(source):
    raise FileNotFoundError(
        f"the first stage {source} (first_stage.path) does not exist: if it moved, give its "
        f"new place with --first_stage=PATH (sample, export, evaluate) or "
        f"--config.first_stage.path=PATH (training)")
  from ldm_jax.convert.files import WeightFileError
  try:
    autoencoder = first_stage.load_first_stage(source)
  except WeightFileError as e:  # names the key to fix, as train.init_from's errors do
    raise WeightFileError(f"first_stage.path={source}: {e}") from None
  if autoencoder.spec.kind != config.first_stage.kind:
    raise ValueError(f"first_stage.kind={config.first_stage.kind!r} but "
                     f"{config.first_stage.path} holds a {autoencoder.spec.kind!r} model")
  if autoencoder.spec.downsample_factor != config.first_stage.downsample_factor:
    raise ValueError(f"first_stage.downsample_factor={config.first_stage.downsample_factor} "
                     f"but the autoencoder downsamples by {autoencoder.spec.downsample_factor}")
  return autoencoder


def _iterator(run: LDMRun):
  config = run.config
  if config.first_stage.cache_dir:
    return latent_iterator(config.first_stage.cache_dir, run.data.split,
                           global_batch_size=run.global_batch, seed=run.data.seed)
  return train_iterator(run.data, global_batch_size=run.global_batch,
                        seed=run.data.seed, conditions=condition_spec(config))


def make_sampler(run: LDMRun, tile: int = 0, overlap: float = 0.25):
  """(state, fields, first_stage_state, key, num=, negative=None) -> images in [-1, 1].

  One jitted program samples and decodes; with `tile` (sample pixels) smaller than the
  image, the program stops at the latents and the first stage decodes them in overlapping
  tiles (`models.tiling.tiled_decode`), so the decoder's memory follows the tile.

  `fields` holds the class / text fields and the concat inputs (`sampler_fields`); the
  images are `data.image_size` square, or sized by the concat input (a low-res image times
  `cond.low_res_factor`, the image to inpaint).
  """
  config, programs = run.config, run.programs
  factor = int(config.first_stage.downsample_factor)
  channels = run.spec.out_channels
  sample_cfg = config.sample
  fs_def = programs.first_stage_def
  concat_spec = programs.concat

  def sample_latents(state, fields, fs_state, key, num: int, negative=None):
    """`negative`: condition fields to guide away from, instead of the null condition."""
    model = ldm_step.eval_model(programs, state)
    noise_key, sampler_key = jax.random.split(key)
    size = concat_spec.image_size(fields, run.data.image_size) // factor
    x = jax.random.normal(noise_key, (num, size, size, channels), jnp.float32)
    cross = {k: fields[k] for k in programs.cond_fields}
    concat = ldm_step.concat_input(programs, fields, x.shape, fs_state, state.latent_norm)
    uncond = negative if negative is not None else model.cond.null_fields(num, tuple(cross))
    # The conditions do not change along the sampling loop: encode them once. The concat
    # input is the same on both sides of guidance.
    fn = samplers.guided(model.denoise, model.encode_conditions(cross, concat),
                         model.encode_conditions(uncond, concat),
                         float(sample_cfg.guidance_scale) if cross else 1.0)
    z = samplers.sample(sample_cfg.sampler, fn, x, programs.schedule, int(sample_cfg.steps),
                        parameterization=programs.loss.parameterization,
                        eta=float(sample_cfg.eta), key=sampler_key)
    return first_stage.denormalize(z, state.latent_norm)  # the first stage's latents

  def sample(state, fields, fs_state, key, num: int, negative=None):
    z = sample_latents(state, fields, fs_state, key, num, negative)
    return nnx.merge(fs_def, fs_state).decode(z)

  if not tile:
    return jax.jit(sample, static_argnames=("num",))
  from ldm_jax.models.tiling import tiled_decode
  latents = jax.jit(sample_latents, static_argnames=("num",))

  def sample_tiled(state, fields, fs_state, key, num: int, negative=None):
    z = latents(state, fields, fs_state, key, num=num, negative=negative)
    return tiled_decode(nnx.merge(fs_def, fs_state), z, tile, overlap)

  return sample_tiled


def sampler_fields(run: LDMRun, batch: dict, seed: int = 0) -> dict:
  """The condition inputs `make_sampler`'s sampler takes, read off a data batch: its class
  or text fields, and concat inputs made from its images as in training (inpainting masks
  drawn from `seed`)."""
  programs = run.programs
  fields = {k: jnp.asarray(batch[k]) for k in programs.cond_fields}
  made = concat_lib.training_fields(programs.concat,
                                {k: jnp.asarray(v) for k, v in batch.items()
                                 if k in ("image", "low_res")}, jax.random.key(seed))
  return {**fields, **made}


def preview_images(run: LDMRun, fields: dict, size: int) -> np.ndarray | None:
  """What a concat-conditioned sampler was given, as images (None without concat input)."""
  shown = concat_lib.preview(run.programs.concat, fields, size)
  return None if shown is None else np.asarray(jax.device_get(shown))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) until config.train.num_steps (see `train.loop`); returns the last
  training scalars and FID / IS."""
  # Resolved before the loop compares it with a saved config.json and saves it.
  return loop.train(sd_source.resolve(config), workdir, setup, export_target=lambda config: (
      pipeline_export_path(workdir) if sd_source.is_sd(config) else None))


def setup(config: ml_collections.ConfigDict, workdir: str) -> loop.Stage:
  """The LDM stage for the loop: first stage loaded, everything checked, the model
  initialized; nothing written yet."""
  run = build_run(config, workdir)
  from ldm_jax.train.ldm_eval import training_evaluation  # it imports this module
  evaluation = training_evaluation(run)  # FID / IS; None without eval.inception_weights
  programs = run.programs
  seed = int(config.train.seed)
  model = build_model(config, run.spec, seed)
  if sd_source.is_sd(config):
    pipe = sd_source.load(config)
    sd_source.initial_weights(model, pipe)  # the fine-tune starts from the pipeline's
    model.cond.set_null_context()
    scale, shift = pipe.latent_norm
    check_export_target(workdir)
  else:
    scale, shift = first_stage.initial_normalization(config.first_stage)
  state = ldm_step.new_state(model, programs, scale, seed, shift_factor=shift)
  logging.info("LDM: %s; learning rate %.3g", ldm_step.describe(programs),
               learning_rate(config.optim, run.global_batch))

  def start(state, iterator, shardings) -> loop.Started:
    batch_sharding = run.layout.batch_sharding()
    # The first batch is read now (its fields give the step's input shardings and the
    # sample grid's conditions) and trained on first: the iterator's position must match
    # the step's.
    pending = [next(iterator)]
    first = pending[0]
    fs_state = jax.device_put(run.first_stage_state, mesh_lib.replicated(run.mesh))
    if int(jax.device_get(state.step)) == 0 and config.first_stage.scale_by_std:
      factor, shift = jax.jit(ldm_step.scale_by_std, static_argnums=(0, 4))(
          programs, mesh_lib.global_batch(first, batch_sharding), fs_state, state.rng,
          bool(config.first_stage.get("shift_by_mean", False)))
      if not (np.isfinite(float(factor)) and np.isfinite(float(shift))):
        raise NonFiniteError(f"scale_by_std: the first batch's latents give a non-finite "
                             f"scale_factor ({float(factor)}) or shift ({float(shift)}); "
                             "check first_stage.path")
      state = state.replace(scale_factor=jax.device_put(factor, shardings.scale_factor),
                            shift_factor=jax.device_put(shift, shardings.shift_factor))
      logging.info("scale_by_std: scale_factor = %.5f, shift_factor = %.5f", float(factor),
                   float(shift))
    logging.info("latents normalized as (z - %.5f) * %.5f",
                 float(jax.device_get(state.shift_factor)),
                 float(jax.device_get(state.scale_factor)))
    compiled = ldm_step.jit_train_step(programs, run.layout, shardings, first, fs_state)

    def train_step(state, step):
      del step  # one program for every step
      local = pending.pop() if pending else next(iterator)
      return compiled(state, mesh_lib.global_batch(local, batch_sharding), fs_state)

    actions = [(int(config.sample.every), SampleGrid(run, first, fs_state, workdir))]
    if evaluation is not None:
      actions.append((int(config.train.eval_every), evaluation))
    return loop.Started(state, train_step, actions)

  lr = learning_rate(config.optim, run.global_batch)
  schedule = ldm_step.lr_schedule(config.optim, lr)
  return loop.Stage(
      name="LDM", layout=run.layout, state=state, guarded=ldm_step.GUARDED,
      make_iterator=lambda: _iterator(run), images_per_step=run.global_batch,
      learning_rate=lambda step: float(schedule(step)),
      start=start, console_keys=("loss",),
      **({} if not sd_source.is_sd(config) else dict(
          export=lambda state: export_pipeline(run, state, pipeline_export_path(workdir)),
          export_exists=lambda: fs.exists(pipeline_export_path(workdir)))))


def pipeline_export_path(workdir: str) -> str:
  """Where an SD fine-tune writes its diffusers pipeline at the end."""
  return fs.join(workdir, "export", "pipeline")


def check_export_target(workdir: str) -> None:
  """Fails before training when the end-of-run export could not replace what is there."""
  from ldm_jax import outputs
  outputs.check_target(pipeline_export_path(workdir), outputs.LDM)


def trained_pipeline(run: LDMRun, state, use_ema: bool = True):
  """An SD run's state as an `ldm_jax.sd.Pipeline`: the trained UNet (EMA weights when
  kept) and text encoder, the VAE, tokenizer and scheduler of the source pipeline, the
  state's latent scale and shift."""
  import dataclasses

  source = sd_source.load(run.config)
  model = ldm_step.eval_model(run.programs, state, use_ema=use_ema)
  scale, shift = (float(jax.device_get(v)) for v in state.latent_norm)
  return dataclasses.replace(source, unet=model.unet, text_encoder=model.cond.encoder,
                             vae=run.first_stage, latent_scale=scale, latent_shift=shift)


def export_pipeline(run: LDMRun, state, out: str, use_ema: bool = True, *,
                    fmt: str = "diffusers", overwrite: bool = False) -> None:
  """Writes an SD run as a pipeline `StableDiffusionPipeline.from_pretrained` loads
  (fmt "diffusers"), or as one SD single file ("single_file")."""
  from ldm_jax.convert.pipeline import save_pipeline
  save_pipeline(trained_pipeline(run, state, use_ema), out, format=fmt, overwrite=overwrite)
  logging.info("exported the fine-tuned pipeline to %s", out)


class SampleGrid:
  """The periodic sample grid: EMA weights, the config's sampler and guidance, conditions
  read off the first training batch; to TensorBoard and `workdir/images/`."""

  def __init__(self, run: LDMRun, batch: dict, fs_state, workdir: str):
    self.run, self.fs_state, self.workdir = run, fs_state, workdir
    self.num = int(run.config.sample.num)
    self.sampler = make_sampler(run)
    self.fields = sampler_fields(run, {k: np.resize(v, (self.num,) + v.shape[1:])
                                       for k, v in batch.items()})

  def __call__(self, state, step: int, writer) -> dict:
    images = np.asarray(jax.device_get(self.sampler(state, self.fields, self.fs_state,
                                                    jax.random.key(step), num=self.num)))
    shown = preview_images(self.run, self.fields, images.shape[1])
    # With a concat input, its picture sits above each sample.
    image = (grid(images) if shown is None else
             grid(np.concatenate([shown, images]), columns=self.num))
    if jax.process_index() == 0:
      writer.write_images(step, {"samples": image[None]})
      save_grid(image, fs.join(self.workdir, "images", f"samples_{step:07d}.png"))
    return {}
