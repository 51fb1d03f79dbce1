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
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metric_writers
from flax import nnx

from ldm_jax.data.latents import latent_iterator
from ldm_jax.data.pipeline import data_report, skipped_records, train_iterator
from ldm_jax.data.sources import check_data
from ldm_jax.diffusion import samplers
from ldm_jax.logs import line_notes
from ldm_jax.train import checkpoint, first_stage, ldm_step
from ldm_jax.train import concat as concat_lib
from ldm_jax.train import mesh as mesh_lib
from ldm_jax.train import resume
from ldm_jax.train.guard import NonFiniteError, NonFiniteGuard, guard_settings
from ldm_jax.train.images import save_grid
from ldm_jax.train.ldm_setup import build_model, build_programs, condition_spec
from ldm_jax.train.optim import learning_rate
from ldm_jax.train.preemption import PreemptionFlag


@dataclasses.dataclass
class LDMRun:
  config: ml_collections.ConfigDict
  workdir: str
  spec: Any
  programs: ldm_step.LDMPrograms
  mesh: Any
  first_stage: Any  # the frozen autoencoder module
  first_stage_state: Any
  global_batch: int


def build_run(config: ml_collections.ConfigDict, workdir: str,
              check_training_data: bool = True) -> LDMRun:
  """Loads and checks everything; nothing is compiled yet."""
  if not config.first_stage.path:
    raise ValueError("set first_stage.path: the autoencoder that made (or decodes) the "
                     "latents, an ldm_jax workdir or PyTorch weights")
  if check_training_data and not config.first_stage.cache_dir:
    check_data(config.data)
  mesh = mesh_lib.make_mesh(config.train.mesh)
  global_batch = int(config.data.batch_size)
  mesh_lib.check_batch(global_batch, mesh)
  source = str(config.first_stage.path)
  if "://" not in source and not os.path.exists(source):
    raise FileNotFoundError(
        f"the first stage {source} (first_stage.path) does not exist: if it moved, give its "
        f"new place with --first_stage=PATH (sample, export, evaluate) or "
        f"--config.first_stage.path=PATH (training)")
  autoencoder = first_stage.load_first_stage(source)
  if autoencoder.spec.kind != config.first_stage.kind:
    raise ValueError(f"first_stage.kind={config.first_stage.kind!r} but "
                     f"{config.first_stage.path} holds a {autoencoder.spec.kind!r} model")
  if autoencoder.spec.downsample_factor != config.first_stage.downsample_factor:
    raise ValueError(f"first_stage.downsample_factor={config.first_stage.downsample_factor} "
                     f"but the autoencoder downsamples by {autoencoder.spec.downsample_factor}")
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
  return LDMRun(config, workdir, spec, programs, mesh, autoencoder, fs_state, global_batch)


def _iterator(run: LDMRun):
  config = run.config
  if config.first_stage.cache_dir:
    return latent_iterator(config.first_stage.cache_dir, config.data.split,
                           global_batch_size=run.global_batch, seed=int(config.data.seed))
  return train_iterator(config.data, global_batch_size=run.global_batch,
                        seed=int(config.data.seed), conditions=condition_spec(config))


def make_sampler(run: LDMRun):
  """jit(state, fields, first_stage_state, key, num=, negative=None) -> images in [-1, 1].

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

  def sample(state, fields, fs_state, key, num: int, negative=None):
    """`negative`: condition fields to guide away from, instead of the null condition."""
    model = ldm_step.eval_model(programs, state)
    noise_key, sampler_key = jax.random.split(key)
    size = concat_spec.image_size(fields, int(config.data.image_size)) // factor
    x = jax.random.normal(noise_key, (num, size, size, channels), jnp.float32)
    cross = {k: fields[k] for k in programs.cond_fields}
    concat = ldm_step.concat_input(programs, fields, x.shape, fs_state, state.scale_factor)
    uncond = negative if negative is not None else model.cond.null_fields(num)
    # The conditions do not change along the sampling loop: encode them once. The concat
    # input is the same on both sides of guidance.
    fn = samplers.guided(model.denoise, model.encode_conditions(cross, concat),
                         model.encode_conditions(uncond, concat),
                         float(sample_cfg.guidance_scale) if cross else 1.0)
    z = samplers.sample(sample_cfg.sampler, fn, x, programs.schedule, int(sample_cfg.steps),
                        parameterization=programs.loss.parameterization,
                        eta=float(sample_cfg.eta), key=sampler_key)
    return first_stage.decode(nnx.merge(fs_def, fs_state), z, state.scale_factor)

  return jax.jit(sample, static_argnames=("num",))


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


def grid(images: np.ndarray, columns: int = 4) -> np.ndarray:
  images = np.clip((np.asarray(images) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
  n, h, w, c = images.shape
  rows = -(-n // columns)
  padded = np.zeros((rows * columns, h, w, c), np.uint8)
  padded[:n] = images
  return padded.reshape(rows, columns, h, w, c).transpose(0, 2, 1, 3, 4).reshape(
      rows * h, columns * w, c)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) until config.train.num_steps; returns the last logged scalars.

  As in the first stage: nothing is written to `workdir` before the config is known to
  continue its run and everything is loaded; config.json is replaced after the restore.
  """
  config = resume.prepare(config, workdir)
  run = build_run(config, workdir)
  from ldm_jax.eval.generation import training_evaluation  # it imports this module
  evaluation = training_evaluation(run)  # FID / IS; None without eval.inception_weights
  programs = run.programs
  seed = int(config.train.seed)
  state = ldm_step.new_state(build_model(config, run.spec, seed), programs,
                             float(config.first_stage.scale_factor), seed)
  nonfinite = NonFiniteGuard(ldm_step.GUARDED, *guard_settings(config))
  os.makedirs(workdir, exist_ok=True)
  shardings = mesh_lib.state_shardings(run.mesh, state)
  state = jax.device_put(state, shardings)
  iterator = _iterator(run)
  manager = checkpoint.make_manager(workdir, int(config.train.keep_checkpoints))
  last_saved = manager.latest_step()
  if last_saved is not None:
    logging.info("resuming from the checkpoint at step %d", last_saved)
    state = checkpoint.restore(manager, last_saved, checkpoint.abstract_with_shardings(
        state, shardings), iterator)
  resume.write_config(config, workdir)
  logging.info("LDM: %s; learning rate %.3g", ldm_step.describe(programs),
               learning_rate(config.optim, run.global_batch))

  batch_sharding = mesh_lib.batch_sharding(run.mesh)
  local = next(iterator)
  fs_state = jax.device_put(run.first_stage_state, mesh_lib.replicated(run.mesh))
  step = int(jax.device_get(state.step))
  if step == 0 and config.first_stage.scale_by_std:
    first = mesh_lib.global_batch(local, batch_sharding)
    factor = jax.jit(ldm_step.scale_by_std, static_argnums=0)(programs, first, fs_state,
                                                              state.rng)
    if not np.isfinite(float(factor)):
      raise NonFiniteError(f"scale_by_std: the first batch's latents give a non-finite "
                           f"scale_factor ({float(factor)}); check first_stage.path")
    state = state.replace(scale_factor=jax.device_put(factor, shardings.scale_factor))
    logging.info("scale_by_std: scale_factor = %.5f", float(factor))
  logging.info("latent scale_factor %.5f", float(jax.device_get(state.scale_factor)))
  train_step = ldm_step.jit_train_step(programs, run.mesh, shardings, local, fs_state)
  sampler = make_sampler(run)
  num_samples = int(config.sample.num)
  sample_fields = sampler_fields(run, {k: np.resize(v, (num_samples,) + v.shape[1:])
                                       for k, v in local.items()})

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  num_steps = int(config.train.num_steps)
  preemption = PreemptionFlag()
  totals, count, t_log = None, 0, time.time()
  last = {}
  try:
    pending = local  # already read: the iterator's position must match the step's
    while step < num_steps:
      local, pending = (pending if pending is not None else next(iterator)), None
      state, metrics = train_step(state, mesh_lib.global_batch(local, batch_sharding),
                                  fs_state)
      step += 1
      nonfinite.add(metrics.pop("guard"))
      totals = metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)
      count += 1
      log_due = step % int(config.train.log_every) == 0 or step == num_steps
      save_due = step % int(config.train.ckpt_every) == 0 or step == num_steps
      preempted = preemption.requested()
      if log_due or save_due or preempted:  # the loop syncs here anyway
        nonfinite.check(step, last_saved)  # raises before a bad state is saved
      if log_due:
        scalars = {f"train/{k}": float(v) / count for k, v in jax.device_get(totals).items()}
        elapsed = time.time() - t_log
        scalars["train/skipped_nonfinite"] = nonfinite.skipped
        scalars["data/skipped_records"] = skipped_records()
        writer.write_scalars(step, scalars)
        logging.info("step %d/%d | %.2f steps/s | %.1f img/s | loss=%.4f%s", step, num_steps,
                     count / elapsed, count * run.global_batch / elapsed,
                     scalars["train/loss"], line_notes(nonfinite.note(), data_report()))
        last = scalars
        totals, count, t_log = None, 0, time.time()
      if step % int(config.sample.every) == 0 or step == num_steps:
        images = np.asarray(jax.device_get(sampler(state, sample_fields, fs_state,
                                                   jax.random.key(step), num=num_samples)))
        shown = preview_images(run, sample_fields, images.shape[1])
        # With a concat input, its picture sits above each sample.
        image = (grid(images) if shown is None else
                 grid(np.concatenate([shown, images]), columns=num_samples))
        if jax.process_index() == 0:
          writer.write_images(step, {"samples": image[None]})
          save_grid(image, os.path.join(workdir, "images", f"samples_{step:07d}.png"))
      if evaluation is not None and (step % int(config.train.eval_every) == 0
                                     or step == num_steps):
        last = {**last, **evaluation(state, step, writer)}
      saved = False
      if save_due:
        saved = checkpoint.save(manager, step, state, iterator)
        last_saved = step if saved else last_saved
      if preempted:
        if not saved:
          checkpoint.save(manager, step, state, iterator, force=True)
        manager.wait_until_finished()
        logging.warning("preempted: checkpoint saved at step %d; rerun the same command to "
                        "resume", step)
        return last
  finally:
    preemption.restore()
    manager.wait_until_finished()
    writer.flush()
  return last
