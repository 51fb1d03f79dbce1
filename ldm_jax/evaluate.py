"""Evaluate a first-stage run: `python -m ldm_jax.evaluate --workdir=DIR [--step=N]`.

Reconstructs the validation split (or --split) with the checkpoint's EMA weights (when the
run kept them) and reports PSNR, SSIM, LPIPS (when LPIPS weights are configured) as mean ±
std over images, and rFID (when Inception weights are configured). Writes
`DIR/eval/step_NNNNNNN.json`, a markdown table beside it, and TensorBoard scalars under
`eval/`. The run's saved config.json is used; flags override its `eval` block:

  --inception_weights=inception_fid.safetensors   (see ldm_jax.convert.inception_weights)
  --reference_stats=val_stats.npz                 (see ldm_jax.eval.reference_stats)
  --lpips_weights=lpips_vgg.safetensors --num_examples=N --split=validation --batch_size=B
"""

from __future__ import annotations

import datetime
import json
import os

from absl import app, flags, logging

from ldm_jax.logs import console_logging

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the newest.")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", None,
                                     "Images to score; default config.eval.num_examples "
                                     "(0 = the whole split).")
_SPLIT = flags.DEFINE_string("split", None, "Data split; default config.data.val_split.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch; default config.data.batch_size.")
_INCEPTION = flags.DEFINE_string("inception_weights", None,
                                 "FID Inception safetensors; default config.eval's.")
_REFERENCE = flags.DEFINE_string("reference_stats", None,
                                 "Reference .npz (mu, sigma) of the split for rFID.")
_LPIPS = flags.DEFINE_string("lpips_weights", None,
                             "LPIPS safetensors; default config.loss.lpips_weights.")
flags.mark_flags_as_required(["workdir"])

ORDER = ("rfid", "psnr", "ssim", "lpips")
LABELS = {"rfid": "rFID ↓", "psnr": "PSNR (dB) ↑", "ssim": "SSIM ↑", "lpips": "LPIPS ↓"}


def load_run_config(workdir: str):
  import ml_collections
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} a training workdir?")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if config.get("stage") == "ldm":
    raise ValueError(f"{workdir} is an LDM run; this evaluates first-stage autoencoders")
  return config


def apply_overrides(config, *, num_examples=None, split=None, batch_size=None,
                    inception_weights=None, reference_stats=None, lpips_weights=None):
  """The run's config with evaluation choices replaced (None keeps the saved value)."""
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
  if lpips_weights is not None:
    config.loss.lpips_weights = lpips_weights
  eval_config(config)
  return config


def evaluate_workdir(workdir: str, config, step: int | None = None) -> dict:
  """Scores `workdir`'s checkpoint under `config`; writes the reports; returns them."""
  import jax
  import tqdm
  from clu import metric_writers

  from ldm_jax.data.pipeline import eval_batches
  from ldm_jax.data.sources import make_source
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
  total = len(make_source(config.data, split))
  total = min(total, limit) if limit else total
  logging.info("evaluating step %d on %d images of %r (rFID: %s, LPIPS: %s)", step, total,
               split, "yes" if inception is not None else "no (no Inception weights)",
               "yes" if lpips_model is not None else "no (no LPIPS weights)")
  evaluator = ReconstructionEvaluator(programs, spec.kind, mesh, lpips_model=lpips_model,
                                      inception=inception, reference=reference)
  bar = tqdm.tqdm(total=total, unit="img", desc="evaluate",
                  disable=jax.process_index() > 0)
  with bar:
    out = evaluator.evaluate(state, eval_batches(config.data, split, batch_size=batch_size,
                                                 max_examples=limit), progress=bar.update)
  metrics = out.metrics
  logging.info("step %d: %s", step, summary_line(metrics))
  report = {
      "step": step, "split": split, "num_examples": metrics["num_examples"],
      "metrics": {k: v for k, v in metrics.items() if k != "num_examples"},
      "weights": "ema" if state.ema is not None else "trained",
      "inception_weights": config.eval.inception_weights,
      "reference_stats": config.eval.reference_stats,
      "lpips_weights": config.loss.lpips_weights,
      "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  if jax.process_index() == 0:
    write_reports(workdir, report)
  writer = metric_writers.create_default_writer(os.path.join(workdir, "eval"),
                                                just_logging=jax.process_index() > 0)
  writer.write_scalars(step, {f"eval/{k}": v for k, v in report["metrics"].items()})
  writer.flush()
  return report


def markdown_table(report: dict) -> str:
  m = report["metrics"]
  lines = [f"Step {report['step']}, {report['num_examples']} images of "
           f"`{report['split']}` ({report['weights']} weights)", "",
           "| metric | value |", "|---|---|"]
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console_logging()
  try:
    config = apply_overrides(
        load_run_config(_WORKDIR.value), num_examples=_NUM_EXAMPLES.value,
        split=_SPLIT.value, batch_size=_BATCH.value, inception_weights=_INCEPTION.value,
        reference_stats=_REFERENCE.value, lpips_weights=_LPIPS.value)
    report = evaluate_workdir(_WORKDIR.value, config, _STEP.value)
  except (FileNotFoundError, ValueError) as e:  # missing files, bad config: no traceback
    raise SystemExit(f"error: {e}") from None
  print(markdown_table(report))


if __name__ == "__main__":
  app.run(main)
