"""Export a trained workdir for PyTorch users.

  python -m ldm_jax.export --workdir=DIR --format=diffusers --out=PATH

Uses the EMA weights when the run kept them (--noema for the raw ones), from the newest
checkpoint (or --step). An autoencoder run: diffusers gives a folder for
`AutoencoderKL.from_pretrained`, compvis one .safetensors with CompVis keys. An LDM run:
see `export_ldm_workdir` (UNet, first stage and condition encoder together).
"""

from __future__ import annotations

import os

from absl import app, flags, logging

from ldm_jax.logs import console_logging

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_FORMAT = flags.DEFINE_enum("format", "diffusers", ["diffusers", "compvis"], "Layout.")
_OUT = flags.DEFINE_string("out", None, "Output folder (diffusers) or .safetensors (compvis).")
_EMA = flags.DEFINE_boolean("ema", True, "Export the EMA weights when the run has them.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the newest.")
flags.mark_flags_as_required(["workdir", "out"])


def export_workdir(workdir: str, out: str, fmt: str = "diffusers", use_ema: bool = True,
                   step: int | None = None) -> int:
  """Writes the autoencoder of `workdir`'s checkpoint to `out`; returns the step exported."""
  from ldm_jax.convert import save_autoencoder
  from ldm_jax.train.first_stage import restore_autoencoder

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
  import json as json_lib

  import jax
  import ml_collections
  import numpy as np

  from ldm_jax.convert.autoencoder import save_autoencoder
  from ldm_jax.convert.files import atomic_path, write_safetensors
  from ldm_jax.convert.torch_layout import export_state
  from ldm_jax.convert.unet import save_unet, to_compvis
  from ldm_jax.train import checkpoint, ldm_step
  from ldm_jax.train.ldm_setup import abstract_state
  from ldm_jax.train.ldm_trainer import build_run

  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json_lib.load(f))
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
          json_lib.dump(config.cond.to_dict(), f, indent=2)
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console_logging()
  import json as json_lib
  with open(os.path.join(_WORKDIR.value, "config.json")) as f:
    stage = json_lib.load(f).get("stage", "autoencoder")
  export = export_ldm_workdir if stage == "ldm" else export_workdir
  export(_WORKDIR.value, _OUT.value, _FORMAT.value, _EMA.value, _STEP.value)


if __name__ == "__main__":
  app.run(main)
