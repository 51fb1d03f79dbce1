"""Export a trained workdir for PyTorch users.

  python -m ldm_jax.export --workdir=DIR --format=diffusers --out=PATH

Uses the EMA weights when the run kept them (--noema for the raw ones), from the newest
checkpoint (or --step). diffusers: a folder for `AutoencoderKL.from_pretrained`;
compvis: one .safetensors with CompVis keys.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_FORMAT = flags.DEFINE_enum("format", "diffusers", ["diffusers", "compvis"], "Layout.")
_OUT = flags.DEFINE_string("out", None, "Output folder (diffusers) or .safetensors (compvis).")
_EMA = flags.DEFINE_boolean("ema", True, "Export the EMA weights when the run has them.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the newest.")
flags.mark_flags_as_required(["workdir", "out"])


def export_workdir(workdir: str, out: str, fmt: str = "diffusers", use_ema: bool = True,
                   step: int | None = None) -> int:
  """Writes the autoencoder of `workdir`'s checkpoint to `out`; returns the step exported."""
  import jax
  import ml_collections

  from ldm_jax.convert import save_autoencoder
  from ldm_jax.train import autoencoder_step as step_lib
  from ldm_jax.train import checkpoint
  from ldm_jax.train.autoencoder_setup import abstract_state, build_programs

  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path} not found: is {workdir} a training workdir?")
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  spec, programs = build_programs(config)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        abstract_state(config, spec, programs))
  state, restored_step = checkpoint.restore_state_only(workdir, target, step)
  model = step_lib.eval_model(programs, state, use_ema=use_ema)
  save_autoencoder(model, out, format=fmt)
  logging.info("exported step %d (%s weights) to %s", restored_step,
               "EMA" if use_ema and state.ema is not None else "trained", out)
  return restored_step


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  export_workdir(_WORKDIR.value, _OUT.value, _FORMAT.value, _EMA.value, _STEP.value)


if __name__ == "__main__":
  app.run(main)
