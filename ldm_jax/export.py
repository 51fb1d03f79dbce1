"""Export a trained workdir for PyTorch users.

  python -m ldm_jax.export --workdir=DIR --format=diffusers --out=PATH

Uses the EMA weights when the run kept them (--noema for the raw ones), from the newest
checkpoint (or --step). An autoencoder run: diffusers gives a folder for
`AutoencoderKL.from_pretrained`, compvis one .safetensors with CompVis keys. An LDM run:
see `ldm_jax.train.export.export_ldm_workdir` (UNet, first stage and condition
encoder together).

A previous export at --out is replaced atomically; anything else there is refused unless
--overwrite, and the workdir itself (or any folder holding a run) never is.
"""

from __future__ import annotations

from absl import app, flags

from ldm_jax import cli
from ldm_jax.logs import console_logging

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_FORMAT = flags.DEFINE_enum("format", "diffusers", ["diffusers", "compvis"], "Layout.")
_OUT = flags.DEFINE_string("out", None, "Output folder (diffusers) or .safetensors (compvis).")
_EMA = flags.DEFINE_boolean("ema", True, "Export the EMA weights when the run has them.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the newest.")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False, "Replace --out even when it is not a "
                                  "previous export (never a training workdir).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "float16", "bfloat16"],
                           "Autoencoder runs: the weights' type on disk (16 bits: half the "
                           "size; loading casts back to float32).")
_FIRST_STAGE = flags.DEFINE_string("first_stage", None,
                                   "LDM: the first stage's workdir or weights, when it moved "
                                   "since training (replaces config.first_stage.path).")
_VERBOSE = flags.DEFINE_boolean("verbose", False, cli.VERBOSE_HELP)
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  from ldm_jax.fs import configure_storage
  configure_storage()  # gs:// (and a GCS emulator) for every storage library: see ldm_jax.fs
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console_logging()
  from ldm_jax.train.export import export_any_workdir
  # A wrong workdir, target, format or step: one `error:` line (cli.run), not
  # app.UsageError, which prints all the help.
  export_any_workdir(_WORKDIR.value, _OUT.value, _FORMAT.value, _EMA.value, _STEP.value,
                     overwrite=_OVERWRITE.value, first_stage=_FIRST_STAGE.value,
                     dtype=_DTYPE.value)


if __name__ == "__main__":
  cli.run(main, _VERBOSE)
