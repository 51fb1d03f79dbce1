"""Inception statistics of a dataset split (the library half of `reference_stats`)."""

from __future__ import annotations

from absl import logging


def compute_reference_stats(data, split: str, inception_weights: str, out: str,
                            *, batch_size: int, num_examples: int = 0,
                            overwrite: bool = False) -> int:
  """Writes the (mu, sigma) of `split` of `data` (a data.spec.DataSpec) to `out`; returns
  the number of images used. A file at `out` that ldm_jax did not write as statistics is
  refused unless `overwrite`."""
  import jax
  import tqdm

  from ldm_jax.data.pipeline import eval_batches
  from ldm_jax.eval import fid as fid_lib
  from ldm_jax.eval.reconstruction import feature_stats
  from ldm_jax.eval.workdir import num_images
  from ldm_jax.models.inception import make_inception
  from ldm_jax import mesh as mesh_lib

  from ldm_jax import outputs
  if not out.endswith(".npz"):
    raise ValueError(f"--out must end in .npz, got {out!r}")
  outputs.check_target(out, outputs.REFERENCE_STATS, overwrite=overwrite)  # before the work
  inception = make_inception(inception_weights)
  mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1})
  mesh_lib.check_batch(batch_size, mesh)
  total = num_images(data, split, num_examples or None)
  bar = tqdm.tqdm(total=total, unit="img", desc="reference stats",
                  disable=jax.process_index() > 0)
  with bar:
    stats = feature_stats(inception, mesh_lib.batch_sharding(mesh), eval_batches(
        data, split, batch_size=batch_size, max_examples=num_examples or None),
        progress=bar.update)
  if jax.process_index() == 0:
    fid_lib.save_stats(out, stats.mean(), stats.covariance(), overwrite=overwrite,
                       num_examples=stats.count)
  logging.info("wrote the Inception statistics of %d images of %r to %s", stats.count, split,
               out)
  return stats.count
