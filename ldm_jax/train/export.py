"""Exports a training workdir's checkpoint in the PyTorch layouts (diffusers or CompVis).

The workdir's config.json says what the run trained; the weights come from its newest
checkpoint (or a given step), EMA when the run kept them. `ldm_jax.export` is the command.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import logging

from ldm_jax.convert.autoencoder import save_autoencoder
from ldm_jax.convert.files import atomic_path, write_safetensors
from ldm_jax.convert.torch_layout import export_state
from ldm_jax.convert.unet import save_unet, to_compvis
from ldm_jax.eval.workdir import is_ldm, load_run_config
from ldm_jax.train import checkpoint, ldm_step
from ldm_jax.train.first_stage import restore_autoencoder
from ldm_jax.train.ldm_setup import abstract_state
from ldm_jax.train.ldm_trainer import build_run


def export_workdir(workdir: str, out: str, fmt: str = "diffusers", use_ema: bool = True,
                   step: int | None = None) -> int:
  """Writes the autoencoder of `workdir`'s checkpoint to `out`; returns the step exported."""
  model, restored_step, has_ema = restore_autoencoder(workdir, use_ema, step)
  save_autoencoder(model, out, format=fmt)
  logging.info("exported step %d (%s weights) to %s", restored_step,
               "EMA" if use_ema and has_ema else "trained", out)
  return restored_step


def export_ldm_workdir(workdir: str, out: str, fmt: str = "diffusers", use_ema: bool = True,
                       step: int | None = None) -> int:
  """An LDM run for PyTorch users. diffusers: a folder with unet/ (UNet2DConditionModel),
  vae/ (AutoencoderKL or VQModel, scaling_factor = the run's latent scale) and, when the
  model has one, cond/ (the condition encoder's tensors and its config; it has no
  diffusers class). compvis: one .safetensors in the LDM checkpoint layout
  (model.diffusion_model.*, first_stage_model.*, cond_stage_model.*)."""
  config = load_run_config(workdir)
  run = build_run(config, workdir, check_training_data=False)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        abstract_state(config, run.spec, run.programs))
  state, restored = checkpoint.restore_state_only(workdir, target, step)
  model = ldm_step.eval_model(run.programs, state, use_ema=use_ema)
  scale = float(jax.device_get(state.scale_factor))
  cond = ({f"cond_stage_model.{k}": v for k, v in export_state(model.cond).items()}
          if model.cond.encoder is not None else {})
  if fmt == "diffusers":
    with atomic_path(out) as tmp:
      os.makedirs(tmp)
      save_unet(model.unet, os.path.join(tmp, "unet"), format="diffusers")
      save_autoencoder(run.first_stage, os.path.join(tmp, "vae"), format="diffusers",
                       scaling_factor=scale)
      if cond:
        write_safetensors({k.split(".", 1)[1]: v for k, v in cond.items()},
                          os.path.join(tmp, "cond", "model.safetensors"))
        with open(os.path.join(tmp, "cond", "config.json"), "w") as f:
          json.dump(config.cond.to_dict(), f, indent=2)
  elif fmt == "compvis":
    tensors = {f"model.diffusion_model.{k}": v
               for k, v in to_compvis(export_state(model.unet), run.spec).items()}
    tensors.update({f"first_stage_model.{k}": v
                    for k, v in export_state(run.first_stage).items()})
    tensors.update(cond)
    tensors["scale_factor"] = np.asarray(scale, np.float32)
    write_safetensors(tensors, out)
  else:
    raise ValueError(f"format must be 'diffusers' or 'compvis', got {fmt!r}")
  logging.info("exported LDM step %d to %s (latent scale %.5f)", restored, out, scale)
  return restored


def export_any_workdir(workdir: str, out: str, fmt: str = "diffusers", use_ema: bool = True,
                       step: int | None = None) -> int:
  """Exports an autoencoder or an LDM run, whichever `workdir` holds."""
  export = export_ldm_workdir if is_ldm(load_run_config(workdir)) else export_workdir
  return export(workdir, out, fmt, use_ema, step)
