"""Scoring a training workdir's checkpoint, and the reports it writes.

The library half of `python -m ldm_jax.evaluate` (flags live there): the run's saved
config.json with evaluation overrides, and for a first-stage run the checkpoint restored
onto the mesh and one streaming pass of `eval.reconstruction` (an LDM run goes to
`eval.generation` instead); either way `DIR/eval/step_NNNNNNN.json`, a markdown table
beside it and TensorBoard scalars under `eval/`.
"""

from __future__ import annotations

import datetime
import json
import os

from absl import logging

ORDER = ("fid", "is", "rfid", "psnr", "ssim", "lpips")
LABELS = {"fid": "FID ↓", "is": "IS ↑", "rfid": "rFID ↓", "psnr": "PSNR (dB) ↑",
          "ssim": "SSIM ↑", "lpips": "LPIPS ↓"}


def load_run_config(workdir: str):
  """A training run's saved config.json, of either stage (see `is_ldm`)."""
  import ml_collections
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} a training workdir?")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def is_ldm(config) -> bool:
  return config.get("stage") == "ldm"


def apply_overrides(config, *, num_examples=None, split=None, batch_size=None,
                    inception_weights=None, reference_stats=None, lpips_weights=None,
                    sampler=None, steps=None, guidance=None):
  """The run's config with evaluation choices replaced (None keeps the saved value).

  `lpips_weights` applies to first-stage runs, `sampler`, `steps` and `guidance`
  (config.sample.*) to LDM runs; given for the other kind they are an error.
  """
  from ldm_jax.eval.setup import eval_config
  config = config.copy_and_resolve_references()
  config.eval = eval_config(config).to_dict()
  for key, value in (("inception_weights", inception_weights),
                     ("reference_stats", reference_stats), ("num_examples", num_examples)):
    if value is not None:
      config.eval[key] = value
  if split is not None:
    config.data.val_split = split
  if batch_size is not None:
    config.data.batch_size = batch_size
  sample = {"sampler": sampler, "steps": steps, "guidance_scale": guidance}
  if is_ldm(config):
    if lpips_weights is not None:
      raise ValueError("lpips_weights scores autoencoder reconstructions; an LDM run is "
                       "scored by FID and IS of its samples")
    for key, value in sample.items():
      if value is not None:
        config.sample[key] = value
  else:
    given = [k for k, v in sample.items() if v is not None]
    if given:
      raise ValueError(f"sample.{given} apply to LDM runs; this is a first-stage run")
    if lpips_weights is not None:
      config.loss.lpips_weights = lpips_weights
  eval_config(config)
  return config


def num_images(data_config, split: str, limit: int | None) -> int:
  """How many records of `split` an evaluation of at most `limit` (None = all) reads."""
  from ldm_jax.data.sources import make_source
  total = len(make_source(data_config, split))
  return min(total, limit) if limit else total


def evaluate_workdir(workdir: str, config, step: int | None = None) -> dict:
  """Scores `workdir`'s checkpoint under `config`; writes the reports; returns them."""
  import jax
  import tqdm

  from ldm_jax.data.pipeline import eval_batches
  from ldm_jax.eval.reconstruction import ReconstructionEvaluator, summary_line
  from ldm_jax.eval.setup import eval_networks
  from ldm_jax.models.lpips import make_lpips
  from ldm_jax.train import checkpoint, mesh as mesh_lib
  from ldm_jax.train.autoencoder_setup import abstract_state, build_programs

  spec, programs = build_programs(config)
  mesh = mesh_lib.make_mesh(config.train.mesh)
  batch_size = int(config.data.batch_size)
  mesh_lib.check_batch(batch_size, mesh)
  inception, reference = eval_networks(config)
  lpips_model = make_lpips(config.loss.lpips_weights) if config.loss.lpips_weights else None
  abstract = abstract_state(config, spec, programs)
  target = checkpoint.abstract_with_shardings(abstract,
                                              mesh_lib.state_shardings(mesh, abstract))
  state, step = checkpoint.restore_state_only(workdir, target, step)

  split = config.data.val_split
  limit = int(config.eval.num_examples) or None
  total = num_images(config.data, split, limit)
  logging.info("evaluating step %d on %d images of %r (rFID: %s, LPIPS: %s)", step, total,
               split, "yes" if inception is not None else "no (no Inception weights)",
               "yes" if lpips_model is not None else "no (no LPIPS weights)")
  evaluator = ReconstructionEvaluator(programs, spec.kind, mesh, lpips_model=lpips_model,
                                      inception=inception, reference=reference)
  bar = tqdm.tqdm(total=total, unit="img", desc="evaluate",
                  disable=jax.process_index() > 0)
  with bar:
    out = evaluator.evaluate(state, eval_batches(config.data, split, batch_size=batch_size,
                                                 max_examples=limit),
                             grid=False, progress=bar.update)
  metrics = out.metrics
  logging.info("step %d: %s", step, summary_line(metrics))
  report = make_report(step, split, metrics, state.ema is not None, config,
                       lpips_weights=config.loss.lpips_weights)
  publish(workdir, report)
  return report


def make_report(step: int, split: str, metrics: dict, has_ema: bool, config, **extra) -> dict:
  """The JSON report of either stage: what was scored, with which weights and files."""
  return {
      "step": step, "split": split, "num_examples": metrics["num_examples"],
      "metrics": {k: v for k, v in metrics.items() if k != "num_examples"},
      "weights": "ema" if has_ema else "trained", **extra,
      "inception_weights": config.eval.inception_weights,
      "reference_stats": config.eval.reference_stats,
      "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def publish(workdir: str, report: dict) -> None:
  """The report's JSON and markdown (process 0) and its metrics as `eval/` scalars."""
  import jax
  from clu import metric_writers
  if jax.process_index() == 0:
    write_reports(workdir, report)
  writer = metric_writers.create_default_writer(os.path.join(workdir, "eval"),
                                                just_logging=jax.process_index() > 0)
  writer.write_scalars(report["step"], {f"eval/{k}": v for k, v in report["metrics"].items()})
  writer.flush()


def markdown_table(report: dict) -> str:
  m = report["metrics"]
  if "sampler" in report:  # an LDM: samples, one per example of the split
    what = (f"{report['num_examples']} samples ({report['sampler']}, {report['steps']} "
            f"steps, guidance {report['guidance']:g}) conditioned on")
  else:
    what = f"{report['num_examples']} images of"
  lines = [f"Step {report['step']}, {what} `{report['split']}` ({report['weights']} weights)",
           "", "| metric | value |", "|---|---|"]
  for name in ORDER:
    if name in m:
      value = f"{m[name]:.4f}"
      if f"{name}_std" in m:
        value += f" ± {m[f'{name}_std']:.4f}"
      lines.append(f"| {LABELS[name]} | {value} |")
  return "\n".join(lines) + "\n"


def write_reports(workdir: str, report: dict) -> tuple[str, str]:
  from ldm_jax.convert.files import atomic_path
  base = os.path.join(workdir, "eval", f"step_{report['step']:07d}")
  with atomic_path(base + ".json") as tmp:
    tmp.write_text(json.dumps(report, indent=2) + "\n")
  with atomic_path(base + ".md") as tmp:
    tmp.write_text(markdown_table(report))
  logging.info("wrote %s.json and %s.md", base, base)
  return base + ".json", base + ".md"
