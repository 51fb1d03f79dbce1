"""A first-stage run's checkpoint scored by `eval.reconstruction` (`python -m
ldm_jax.evaluate` on an autoencoder workdir): the checkpoint restored onto the mesh, the
evaluation weights handed to the evaluator as a reconstruct function (tiled on request),
one streaming pass over the split, the reports written."""

from __future__ import annotations

from absl import logging

from ldm_jax import mesh as mesh_lib
from ldm_jax.data.spec import DataSpec
from ldm_jax.eval.reconstruction import ReconstructionEvaluator, summary_line
from ldm_jax.eval.setup import eval_networks
from ldm_jax.eval.workdir import check_reports, make_report, num_images, publish
from ldm_jax.models.lpips import make_lpips
from ldm_jax.train import autoencoder_step as step_lib
from ldm_jax.train import checkpoint
from ldm_jax.train.autoencoder_setup import abstract_state, build_programs


def evaluate_autoencoder_workdir(workdir: str, config, step: int | None = None, *,
                                 tile: int = 0, overlap: float = 0.25) -> dict:
  """Scores `workdir`'s checkpoint under `config` (its config.json with
  `workdir.apply_overrides`); writes the reports; returns them. `tile` (pixels): encode
  and decode in overlapping tiles, for images larger than fit on a device at once."""
  import jax
  import tqdm

  from ldm_jax.data.pipeline import eval_batches

  step = checkpoint.resolve_step(workdir, step)
  check_reports(workdir, step)  # both fail before anything is built
  spec, programs = build_programs(config)
  data = DataSpec.from_config(config.data)
  if tile and tile % spec.downsample_factor:
    raise ValueError(f"--tile={tile} must be a multiple of the model's downsampling factor "
                     f"{spec.downsample_factor}")
  layout = mesh_lib.Layout.from_config(config.train)
  mesh = layout.mesh
  batch_size = data.batch_size
  mesh_lib.check_batch(batch_size, mesh)
  inception, reference = eval_networks(config)
  lpips_model = make_lpips(config.loss.lpips_weights) if config.loss.lpips_weights else None
  abstract = abstract_state(config, spec, programs)
  target = checkpoint.abstract_with_shardings(abstract,
                                              layout.state_shardings(abstract))
  state, step = checkpoint.restore_state_only(workdir, target, step)

  split = data.val_split
  limit = int(config.eval.num_examples) or None
  total = num_images(data, split, limit)
  logging.info("evaluating step %d on %d images of %r (rFID: %s, LPIPS: %s)", step, total,
               split, "yes" if inception is not None else "no (no Inception weights)",
               "yes" if lpips_model is not None else "no (no LPIPS weights)")
  evaluator = ReconstructionEvaluator(
      step_lib.reconstruct_fn(programs, tile, overlap), mesh_lib.batch_sharding(mesh),
      jit_reconstruct=not tile, lpips_model=lpips_model, inception=inception,
      reference=reference)
  bar = tqdm.tqdm(total=total, unit="img", desc="evaluate",
                  disable=jax.process_index() > 0)
  with bar:
    out = evaluator.evaluate(state, eval_batches(data, split, batch_size=batch_size,
                                                 max_examples=limit),
                             grid=False, progress=bar.update)
  metrics = out.metrics
  logging.info("step %d: %s", step, summary_line(metrics))
  extra = {"tile": tile, "tile_overlap": overlap} if tile else {}
  report = make_report(step, split, metrics, state.ema is not None, config,
                       lpips_weights=config.loss.lpips_weights, **extra)
  publish(workdir, report)
  return report
