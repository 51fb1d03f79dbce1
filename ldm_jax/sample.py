"""Samples from a trained LDM workdir, as one PNG grid.

  python -m ldm_jax.sample --workdir=DIR --num=16 --steps=50 --sampler=ddim \
      --guidance=5 [--class_id=N | --prompt="a photo of a cat"] --out=grid.png

Concat-conditioned models take an image: `--image=low_res.png` for super-resolution (the
output is cond.low_res_factor times its size), `--image=photo.png --mask=mask.png` for
inpainting (white in the mask = repaint; the output has the photo's size).

Uses the EMA weights of the newest checkpoint (or --step), the first stage named in the
run's config (or --first_stage, when it moved), and its latent scale. Each batch is one
compiled sampling loop; the bar counts batches. Everything the flags name is checked
before anything is built; an existing --out is replaced only when it is an ldm_jax grid
(or with --overwrite).
"""

from __future__ import annotations

from absl import app, flags, logging

from ldm_jax.diffusion.samplers import SAMPLERS
from ldm_jax.logs import console_logging

_WORKDIR = flags.DEFINE_string("workdir", None, "The LDM training run's workdir.")
_OUT = flags.DEFINE_string("out", "samples.png", "Where to write the grid (PNG).")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False,
                                  "Replace --out even when ldm_jax did not write it.")
_NUM = flags.DEFINE_integer("num", 16, "How many images.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch", 16, "Images per compiled sampling call.", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", None, "Sampler steps (default: the config's).",
                              lower_bound=1)
_SAMPLER = flags.DEFINE_enum("sampler", None, list(SAMPLERS),
                             "Sampler (default: the config's).")
_ETA = flags.DEFINE_float("eta", None, "DDIM eta (default: the config's).")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Classifier-free guidance scale.")
_CLASS = flags.DEFINE_integer("class_id", None, "Class id for class-conditional models.")
_PROMPT = flags.DEFINE_string("prompt", None, "Caption for text-conditional models.")
_NEGATIVE = flags.DEFINE_string("negative_prompt", None, "Used in place of the empty "
                                "caption as the unconditional side of guidance.")
_IMAGE = flags.DEFINE_string("image", None, "Super-resolution: the low-res image; inpainting: "
                             "the image to repaint.")
_MASK = flags.DEFINE_string("mask", None, "Inpainting: a mask of the image's size, white "
                            "where the model repaints.")
_TILE = flags.DEFINE_integer("tile", 0, "Decode in overlapping tiles of this many pixels "
                             "(a multiple of the first stage's factor; 0: whole images), "
                             "for images whose decode does not fit in memory.",
                             lower_bound=0)
_TILE_OVERLAP = flags.DEFINE_float("tile_overlap", 0.25, "Tiles' overlap, as a fraction "
                                   "of the tile.", lower_bound=0.0, upper_bound=0.5)
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the newest.")
_FIRST_STAGE = flags.DEFINE_string("first_stage", None,
                                   "The first stage's workdir or weights, when it moved "
                                   "since training (replaces config.first_stage.path).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  from ldm_jax.fs import configure_storage
  configure_storage()  # gs:// (and a GCS emulator) for every storage library: see ldm_jax.fs
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console_logging()
  from ldm_jax.eval.workdir import is_ldm, load_run_config
  from ldm_jax.train import checkpoint
  from ldm_jax.train.images import check_grid_path

  workdir = _WORKDIR.value
  try:  # everything the flags name, before anything is built
    config = load_run_config(workdir, first_stage=_FIRST_STAGE.value)
    if not is_ldm(config):
      raise ValueError(f"{workdir} holds an autoencoder run, not an LDM")
    out = check_grid_path(_OUT.value, overwrite=_OVERWRITE.value)
    step = checkpoint.resolve_step(workdir, _STEP.value)
    if _NEGATIVE.value is not None and config.cond.kind != "text":
      raise ValueError("--negative_prompt needs a text-conditional model")

  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from None
  if _GUIDANCE.value is not None and _GUIDANCE.value < 0:
    logging.warning("--guidance=%g is negative: samples are pushed away from the condition "
                    "(1 = no guidance, above 1 follows it more closely)", _GUIDANCE.value)

  import jax
  import jax.numpy as jnp
  import numpy as np
  import tqdm

  from ldm_jax.train.images import save_grid
  from ldm_jax.train.ldm_setup import abstract_state, tokenizer
  from ldm_jax.train.ldm_trainer import build_run, grid, make_sampler
  from ldm_jax.train.sample_inputs import concat_fields, condition_fields

  for flag, key in ((_STEPS, "steps"), (_SAMPLER, "sampler"), (_ETA, "eta"),
                    (_GUIDANCE, "guidance_scale")):
    if flag.value is not None:
      config.sample[key] = flag.value
  try:
    fields = condition_fields(config, _NUM.value, _CLASS.value, _PROMPT.value)
    run = build_run(config, workdir, check_training_data=False)
    fields.update(concat_fields(config, run.spec, _NUM.value, _IMAGE.value, _MASK.value))
    factor = run.first_stage.spec.downsample_factor
    if _TILE.value % factor:
      raise ValueError(f"--tile={_TILE.value} must be a multiple of the first stage's "
                       f"downsampling factor {factor}")
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from None
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        abstract_state(config, run.spec, run.programs))
  state, step = checkpoint.restore_state_only(workdir, target, step)
  negative = None
  if _NEGATIVE.value is not None:
    negative = {"tokens": np.repeat(tokenizer(config)([_NEGATIVE.value]), _NUM.value, 0)}
  sampler = make_sampler(run, tile=_TILE.value, overlap=_TILE_OVERLAP.value)
  logging.info("sampling %d images from step %d: %s, %d steps, guidance %.2f", _NUM.value,
               step, config.sample.sampler, config.sample.steps, config.sample.guidance_scale)
  images = []
  starts = range(0, _NUM.value, _BATCH.value)
  for i, start in enumerate(tqdm.tqdm(starts, desc="sampling", unit="batch")):
    count = min(_BATCH.value, _NUM.value - start)
    chunk = {k: jnp.asarray(v[start:start + count]) for k, v in fields.items()}
    neg = (None if negative is None else
           {k: jnp.asarray(v[start:start + count]) for k, v in negative.items()})
    key = jax.random.fold_in(jax.random.key(_SEED.value), i)
    images.append(np.asarray(sampler(state, chunk, run.first_stage_state, key, num=count,
                                     negative=neg)))
  save_grid(grid(np.concatenate(images)), out, overwrite=_OVERWRITE.value)
  logging.info("wrote %s", _OUT.value)


if __name__ == "__main__":
  app.run(main)
