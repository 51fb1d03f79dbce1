"""Export a trained workdir for PyTorch users.

  python -m ldm_jax.export --workdir=DIR --format=diffusers --out=PATH

Uses the EMA weights when the run kept them (--noema for the raw ones), from the newest
checkpoint (or --step). diffusers: a folder for `AutoencoderKL.from_pretrained`;
compvis: one .safetensors with CompVis keys.
"""

from __future__ import annotations

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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console_logging()
  export_workdir(_WORKDIR.value, _OUT.value, _FORMAT.value, _EMA.value, _STEP.value)


if __name__ == "__main__":
  app.run(main)
