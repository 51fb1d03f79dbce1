"""Samples from a trained LDM workdir, as one PNG grid.

  python -m ldm_jax.sample --workdir=DIR --num=16 --steps=50 --sampler=ddim \
      --guidance=5 [--class_id=N | --prompt="a photo of a cat"] --out=grid.png

Concat-conditioned models take an image: `--image=low_res.png` for super-resolution (the
output is cond.low_res_factor times its size), `--image=photo.png --mask=mask.png` for
inpainting (white in the mask = repaint; the output has the photo's size).

Uses the EMA weights of the newest checkpoint (or --step), the first stage named in the
run's config, and its latent scale. Each batch is one compiled sampling loop; the bar
counts batches.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging

from ldm_jax.logs import console_logging

_WORKDIR = flags.DEFINE_string("workdir", None, "The LDM training run's workdir.")
_OUT = flags.DEFINE_string("out", "samples.png", "Where to write the grid (PNG).")
_NUM = flags.DEFINE_integer("num", 16, "How many images.")
_BATCH = flags.DEFINE_integer("batch", 16, "Images per compiled sampling call.")
_STEPS = flags.DEFINE_integer("steps", None, "Sampler steps (default: the config's).")
_SAMPLER = flags.DEFINE_enum("sampler", None, ["ddim", "plms", "dpmpp_2m", "ddpm"],
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
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the newest.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console_logging()
  import jax
  import jax.numpy as jnp
  import ml_collections
  import numpy as np
  import tqdm

  from ldm_jax.train import checkpoint
  from ldm_jax.train.images import save_grid
  from ldm_jax.train.ldm_setup import abstract_state, tokenizer
  from ldm_jax.train.ldm_trainer import build_run, grid, make_sampler
  from ldm_jax.train.sample_inputs import concat_fields, condition_fields

  config_path = os.path.join(_WORKDIR.value, "config.json")
  if not os.path.exists(config_path):
    raise app.UsageError(f"{config_path} not found: is {_WORKDIR.value} an LDM workdir?")
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if config.get("stage") != "ldm":
    raise app.UsageError(f"{_WORKDIR.value} holds an autoencoder run, not an LDM")
  for flag, key in ((_STEPS, "steps"), (_SAMPLER, "sampler"), (_ETA, "eta"),
                    (_GUIDANCE, "guidance_scale")):
    if flag.value is not None:
      config.sample[key] = flag.value
  try:
    fields = condition_fields(config, _NUM.value, _CLASS.value, _PROMPT.value)
    run = build_run(config, _WORKDIR.value, check_training_data=False)
    fields.update(concat_fields(config, run.spec, _NUM.value, _IMAGE.value, _MASK.value))
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        abstract_state(config, run.spec, run.programs))
  state, step = checkpoint.restore_state_only(_WORKDIR.value, target, _STEP.value)
  negative = None
  if _NEGATIVE.value is not None:
    if config.cond.kind != "text":
      raise app.UsageError("--negative_prompt needs a text-conditional model")
    negative = {"tokens": np.repeat(tokenizer(config)([_NEGATIVE.value]), _NUM.value, 0)}
  sampler = make_sampler(run)
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
  save_grid(grid(np.concatenate(images)), os.path.abspath(_OUT.value))
  logging.info("wrote %s", _OUT.value)


if __name__ == "__main__":
  app.run(main)
