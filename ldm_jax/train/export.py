"""Exports a training workdir's checkpoint in the PyTorch layouts (diffusers or CompVis).

The workdir's config.json says what the run trained; the weights come from its newest
checkpoint (or a given step), EMA when the run kept them. `ldm_jax.export` is the command.
The target is checked before anything is restored (`check_export_target`): never the
workdir, a folder holding it or any other run; a previous export of the same kind is
replaced atomically, anything else only with overwrite=True (see ldm_jax.outputs).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import logging

from ldm_jax import fs, outputs
from ldm_jax.convert.autoencoder import compvis_unsupported, save_autoencoder
from ldm_jax.convert.files import write_safetensors
from ldm_jax.convert.torch_layout import export_state
from ldm_jax.convert.pipeline import scheduler_for_schedule
from ldm_jax.convert.unet import save_unet, to_compvis
from ldm_jax.eval.workdir import is_ldm, load_run_config
from ldm_jax.models.autoencoder import LatentNormalization
from ldm_jax.train import checkpoint, ldm_step, sd_source
from ldm_jax.train.autoencoder_trainer import init_latent_scaling
from ldm_jax.train.first_stage import restore_autoencoder
from ldm_jax.train.ldm_setup import abstract_state
from ldm_jax.train.ldm_trainer import build_run, export_pipeline

FORMATS = ("diffusers", "compvis")


def check_export_target(workdir: str, out: str, fmt: str, kind: str,
                        overwrite: bool = False) -> None:
  """Raises (ValueError / outputs.OutputError) unless `out` can take a `fmt` export of
  `workdir`; reads only."""
  if fmt not in FORMATS:
    raise ValueError(f"format must be 'diffusers' or 'compvis', got {fmt!r}")
  if fmt == "compvis" and not os.fspath(out).endswith(".safetensors"):
    raise ValueError(f"a CompVis export is one .safetensors file; got --out={out}")
  run, target = fs.normalize(workdir), fs.normalize(out)  # gs:// compared as URLs
  suggestion = fs.join(workdir, "export", "ldm" if kind == outputs.LDM else "autoencoder")
  if target == run:
    raise outputs.OutputError(f"--out={out} is the workdir itself; an export never replaces "
                              f"it, not even with --overwrite: use e.g. --out={suggestion}")
  if fs.is_within(run, target):
    raise outputs.OutputError(f"--out={out} holds the workdir {workdir}; replacing it would "
                              "delete the run, so even --overwrite is refused: use e.g. "
                              f"--out={suggestion}")
  outputs.check_target(out, kind, overwrite=overwrite)


def export_workdir(workdir: str, out: str, fmt: str = "diffusers", use_ema: bool = True,
                   step: int | None = None, *, overwrite: bool = False,
                   dtype: str = "float32") -> int:
  """Writes the autoencoder of `workdir`'s checkpoint to `out` (its floating-point tensors
  as `dtype`); returns the step exported."""
  check_export_target(workdir, out, fmt, outputs.AUTOENCODER, overwrite)
  checkpoint.resolve_step(workdir, step)  # a missing step fails before anything is built
  model, restored_step, has_ema = restore_autoencoder(workdir, use_ema, step)
  save_autoencoder(model, out, format=fmt, overwrite=overwrite, dtype=dtype,
                   normalization=LatentNormalization.from_config(
                       init_latent_scaling(load_run_config(workdir).train, workdir)))
  logging.info("exported step %d (%s weights) to %s", restored_step,
               "EMA" if use_ema and has_ema else "trained", out)
  return restored_step


def export_ldm_workdir(workdir: str, out: str, fmt: str = "diffusers", use_ema: bool = True,
                       step: int | None = None, *, overwrite: bool = False,
                       first_stage: str | None = None) -> int:
  """An LDM run for PyTorch users. diffusers: a folder with unet/ (UNet2DConditionModel,
  sample_size = the run's latent size), vae/ (AutoencoderKL or VQModel, scaling_factor =
  the run's latent scale), scheduler/ (a DDIMScheduler with the run's schedule and
  prediction type: `convert.pipeline.scheduler_for_schedule`) and, when the
  model has one, cond/ (the condition encoder's tensors and its config; it has no
  diffusers class). compvis: one .safetensors in the LDM checkpoint layout
  (model.diffusion_model.*, first_stage_model.*, cond_stage_model.*). `first_stage`:
  where the run's first stage is now, when it moved.

  A Stable Diffusion fine-tune (cond.kind "clip") exports as a pipeline instead
  (`convert.save_pipeline`): diffusers, a folder `StableDiffusionPipeline.from_pretrained`
  loads; compvis, one SD single file."""
  config = load_run_config(workdir, first_stage=first_stage)
  check_export_target(workdir, out, fmt, outputs.LDM, overwrite)
  checkpoint.resolve_step(workdir, step)  # a missing step fails before anything is built
  run = build_run(config, workdir, check_training_data=False)
  if fmt == "compvis" and (problem := compvis_unsupported(run.first_stage.spec)):
    raise ValueError(f"the first stage cannot go into a CompVis checkpoint: {problem}")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        abstract_state(config, run.spec, run.programs))
  state, restored = checkpoint.restore_state_only(workdir, target, step)
  if sd_source.is_sd(config):
    export_pipeline(run, state, out, use_ema, overwrite=overwrite,
                    fmt="diffusers" if fmt == "diffusers" else "single_file")
    logging.info("exported SD fine-tune step %d to %s", restored, out)
    return restored
  model = ldm_step.eval_model(run.programs, state, use_ema=use_ema)
  scale = float(jax.device_get(state.scale_factor))
  shift = float(jax.device_get(state.shift_factor))
  cond = ({f"cond_stage_model.{k}": v for k, v in export_state(model.cond).items()}
          if model.cond.encoder is not None else {})
  if fmt == "diffusers":
    with outputs.atomic_path(out, outputs.LDM, overwrite=overwrite) as tmp:
      os.makedirs(tmp)  # local for a gs:// --out too: outputs stages it, then uploads
      factor = run.first_stage.spec.downsample_factor
      save_unet(model.unet, os.path.join(tmp, "unet"), format="diffusers",
                sample_size=int(config.data.image_size) // factor)
      diffusion = config.diffusion
      os.makedirs(os.path.join(tmp, "scheduler"))
      with open(os.path.join(tmp, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(scheduler_for_schedule(
            diffusion.beta_schedule, diffusion.timesteps, diffusion.linear_start,
            diffusion.linear_end, diffusion.get("cosine_s", 8e-3),
            diffusion.parameterization), f, indent=2)
      # The run's normalization, not what its first stage's source states (force_upcast
      # aside): no shift reads as none in diffusers, and per-channel statistics the run
      # did not use are left out.
      save_autoencoder(run.first_stage, os.path.join(tmp, "vae"), format="diffusers",
                       scaling_factor=scale, shift_factor=shift or None,
                       latents_mean=None, latents_std=None)
      if cond:
        write_safetensors({k.split(".", 1)[1]: v for k, v in cond.items()},
                          os.path.join(tmp, "cond", "model.safetensors"), kind=outputs.LDM)
        with open(os.path.join(tmp, "cond", "config.json"), "w") as f:
          json.dump(config.cond.to_dict(), f, indent=2)
  else:
    tensors = {f"model.diffusion_model.{k}": v
               for k, v in to_compvis(export_state(model.unet), run.spec).items()}
    tensors.update({f"first_stage_model.{k}": v
                    for k, v in export_state(run.first_stage).items()})
    tensors.update(cond)
    tensors["scale_factor"] = np.asarray(scale, np.float32)
    if shift:
      tensors["shift_factor"] = np.asarray(shift, np.float32)
    write_safetensors(tensors, out, kind=outputs.LDM, overwrite=overwrite)
  logging.info("exported LDM step %d to %s (latent scale %.5f, shift %.5f)", restored, out,
               scale, shift)
  return restored


def export_any_workdir(workdir: str, out: str, fmt: str = "diffusers", use_ema: bool = True,
                       step: int | None = None, *, overwrite: bool = False,
                       first_stage: str | None = None, dtype: str = "float32") -> int:
  """Exports an autoencoder or an LDM run, whichever `workdir` holds (`dtype`: the
  autoencoder's tensors on disk; LDM exports are float32)."""
  config = load_run_config(workdir, first_stage=first_stage)  # first_stage: LDM runs only
  if is_ldm(config):
    if dtype != "float32":
      raise ValueError(f"--dtype={dtype} is for autoencoder runs; {workdir} is an LDM run, "
                       f"whose export is float32")
    return export_ldm_workdir(workdir, out, fmt, use_ema, step, overwrite=overwrite,
                              first_stage=first_stage)
  return export_workdir(workdir, out, fmt, use_ema, step, overwrite=overwrite, dtype=dtype)
