"""Evaluate a training run: `python -m ldm_jax.evaluate --workdir=DIR [--step=N]`.

A first-stage run: reconstructs the validation split (or --split) with the checkpoint's
EMA weights (when the run kept them) and reports PSNR, SSIM, LPIPS (when LPIPS weights are
configured) as mean ± std over images, and rFID (when Inception weights are configured).

An LDM run (config.json with stage "ldm"): draws one sample per example of the split,
conditioned on that example's label or caption, with the EMA weights and the run's
sampler, and reports FID against the split (or --reference_stats) and the Inception
Score, and with --clip_model (text-conditioned runs) the CLIP score of each sample
against its caption. Inception weights are required; --sampler, --steps and --guidance
override the run's `sample` block.

Writes `DIR/eval/step_NNNNNNN.json`, a markdown table beside it, and TensorBoard scalars
under `eval/`. The run's saved config.json is used; flags override its `eval` block:

  --inception_weights=inception_fid.safetensors   (see ldm_jax.convert.inception_weights)
  --reference_stats=val_stats.npz                 (see ldm_jax.eval.reference_stats)
  --num_examples=N --split=validation --batch_size=B
  --lpips_weights=lpips_vgg.safetensors           (first stage)
  --sampler=ddim --steps=50 --guidance=3          (LDM)
  --clip_model=PATH                               (LDM, text: a transformers CLIPModel folder)
  --first_stage=PATH                              (LDM: its first stage moved)
  --tile=512 [--tile_overlap=0.25]                (encode / decode in overlapping tiles)
"""

from __future__ import annotations

from absl import app, flags

from ldm_jax.diffusion.samplers import SAMPLERS
from ldm_jax.eval.workdir import (apply_overrides, check_reports, is_ldm, load_run_config,
                                  markdown_table)
from ldm_jax import cli
from ldm_jax.logs import console_logging

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the newest.")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", None,
                                     "Examples to score (LDM: one sample each); default "
                                     "config.eval.num_examples (0 = the whole split).")
_SPLIT = flags.DEFINE_string("split", None, "Data split; default config.data.val_split.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch; default config.data.batch_size.")
_INCEPTION = flags.DEFINE_string("inception_weights", None,
                                 "FID Inception safetensors; default config.eval's.")
_REFERENCE = flags.DEFINE_string("reference_stats", None,
                                 "Reference .npz (mu, sigma) of the split for rFID / FID.")
_LPIPS = flags.DEFINE_string("lpips_weights", None,
                             "First stage: LPIPS safetensors; default config.loss's.")
_SAMPLER = flags.DEFINE_enum("sampler", None, list(SAMPLERS),
                             "LDM: sampler; default config.sample.sampler.")
_STEPS = flags.DEFINE_integer("steps", None, "LDM: sampler steps; default config.sample's.")
_GUIDANCE = flags.DEFINE_float("guidance", None,
                               "LDM: classifier-free guidance scale; default config.sample's.")
_CLIP_MODEL = flags.DEFINE_string("clip_model", None,
                                  "LDM with text conditions: a transformers CLIPModel folder "
                                  "(config.json, model.safetensors, tokenizer files in it or in "
                                  "tokenizer/ beside it) for the CLIP score; default "
                                  "config.eval.clip_model (\"\" = none).")
_FIRST_STAGE = flags.DEFINE_string("first_stage", None,
                                   "LDM: the first stage's workdir or weights, when it moved "
                                   "since training (replaces config.first_stage.path).")
_TILE = flags.DEFINE_integer("tile", 0, "Encode and decode (LDM: decode the samples) in "
                             "overlapping tiles of this many pixels, a multiple of the "
                             "downsampling factor, so memory follows the tile, not the image "
                             "(one host); 0 = whole images.", lower_bound=0)
_TILE_OVERLAP = flags.DEFINE_float("tile_overlap", 0.25, "Tiles' overlap, as a fraction of the "
                                   "tile.", lower_bound=0.0, upper_bound=0.5)
_VERBOSE = flags.DEFINE_boolean("verbose", False, cli.VERBOSE_HELP)
flags.mark_flags_as_required(["workdir"])


def main(argv):
  from ldm_jax.fs import configure_storage
  configure_storage()  # gs:// (and a GCS emulator) for every storage library: see ldm_jax.fs
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console_logging()
  try:
    saved = load_run_config(_WORKDIR.value, first_stage=_FIRST_STAGE.value)
    config = apply_overrides(
        saved, num_examples=_NUM_EXAMPLES.value, split=_SPLIT.value, batch_size=_BATCH.value,
        inception_weights=_INCEPTION.value, reference_stats=_REFERENCE.value,
        lpips_weights=_LPIPS.value, sampler=_SAMPLER.value, steps=_STEPS.value,
        guidance=_GUIDANCE.value, clip_model=_CLIP_MODEL.value)
    if is_ldm(config):
      from ldm_jax.train.ldm_eval import evaluate_ldm_workdir
      from ldm_jax.train.checkpoint import resolve_step
      check_reports(_WORKDIR.value, resolve_step(_WORKDIR.value, _STEP.value))  # before work
      report = evaluate_ldm_workdir(_WORKDIR.value, config, _STEP.value, tile=_TILE.value,
                                    overlap=_TILE_OVERLAP.value)
    else:
      from ldm_jax.train.autoencoder_eval import evaluate_autoencoder_workdir
      report = evaluate_autoencoder_workdir(_WORKDIR.value, config, _STEP.value,
                                            tile=_TILE.value, overlap=_TILE_OVERLAP.value)
  except (FileNotFoundError, ValueError) as e:  # missing files, bad config: no traceback
    cli.fail(e, _VERBOSE.value)
  print(markdown_table(report))


if __name__ == "__main__":
  cli.run(main, _VERBOSE)
