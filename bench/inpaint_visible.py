"""How much an inpainting LDM keeps of what it was shown: PSNR of its samples against the
original images over the pixels the mask leaves visible, with half of each image masked
against the whole of it masked (then the model sees nothing, so the gap is what the
concat input carries), beside the autoencoder's own reconstruction PSNR (the ceiling).

  .venv/bin/python bench/inpaint_visible.py --workdir=workdir/ldm_inpaint_demo [--num=12]

Validation split of the run's data, center crops, each with its own caption; the run's
sampler, steps and guidance; one seed.
"""

from __future__ import annotations

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "An LDM workdir trained with cond.concat='inpaint'.")
_NUM = flags.DEFINE_integer("num", 12, "Validation images.")
flags.mark_flags_as_required(["workdir"])


def psnr(a, b, where):
  import numpy as np
  a, b = (np.clip((x + 1) * 127.5, 0, 255) for x in (a, b))
  err = ((a - b)**2 * where).sum(axis=(1, 2, 3)) / (where.sum(axis=(1, 2, 3)) * 3)
  return 10 * np.log10(255.0**2 / err)


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  from ldm_jax.data.pipeline import eval_batches
  from ldm_jax.eval.workdir import load_run_config
  from ldm_jax.train import checkpoint, first_stage
  from ldm_jax.train.ldm_setup import abstract_state, condition_spec
  from ldm_jax.train.ldm_trainer import build_run, make_sampler

  config = load_run_config(_WORKDIR.value)
  if config.cond.get("concat") != "inpaint":
    raise app.UsageError(f"{_WORKDIR.value} is not an inpainting run (cond.concat)")
  run = build_run(config, _WORKDIR.value, check_training_data=False)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        abstract_state(config, run.spec, run.programs))
  state, step = checkpoint.restore_state_only(_WORKDIR.value, target)
  batch = next(eval_batches(run.data, run.data.val_split, batch_size=_NUM.value,
                            max_examples=_NUM.value, conditions=condition_spec(config)))
  keep = np.asarray(batch["mask"], bool)
  images = jnp.asarray(batch["image"])
  n, size = images.shape[0], images.shape[1]
  sampler = make_sampler(run)
  cross = {k: jnp.asarray(batch[k]) for k in run.programs.cond_fields}
  half = np.zeros((n, size, size, 1), np.float32)
  half[:, :, size // 2:] = 1  # the right half is repainted
  visible = 1 - half
  rows = {}
  for name, mask in (("right half masked", half), ("all masked", np.ones_like(half))):
    fields = {**cross, "image": images, "inpaint_mask": jnp.asarray(mask)}
    out = np.asarray(sampler(state, fields, run.first_stage_state, jax.random.key(0), num=n))
    rows[name] = psnr(out, np.asarray(images), visible)[keep]
  recon = run.first_stage.decode(first_stage.encode_mean(run.first_stage, images))
  rows["autoencoder reconstruction"] = psnr(np.asarray(recon), np.asarray(images),
                                            visible)[keep]
  print(f"step {step}, {int(keep.sum())} validation images of {size}x{size}, "
        f"{config.sample.sampler} {config.sample.steps} steps, guidance "
        f"{config.sample.guidance_scale}: PSNR (dB) over the left (visible) half")
  for name, values in rows.items():
    print(f"| {name} | {values.mean():.2f} ± {values.std():.2f} |")


if __name__ == "__main__":
  app.run(main)
