"""Scoring a training workdir's checkpoint, and the reports it writes.

The library half of `python -m ldm_jax.evaluate` (flags live there): the run's saved
config.json with evaluation overrides, and the reports either stage writes,
`DIR/eval/step_NNNNNNN.json`, a markdown table beside it and TensorBoard scalars under
`eval/`. Restoring a checkpoint and building the function an evaluator takes is the
stage's own (`train.autoencoder_eval`, `train.ldm_eval`): nothing here imports `train/`.
"""

from __future__ import annotations

import datetime
import json

from absl import logging

from ldm_jax import fs

ORDER = ("fid", "is", "clip_score", "rfid", "psnr", "ssim", "lpips")
LABELS = {"fid": "FID ↓", "is": "IS ↑", "clip_score": "CLIP score ↑", "rfid": "rFID ↓",
          "psnr": "PSNR (dB) ↑", "ssim": "SSIM ↑", "lpips": "LPIPS ↓"}


def load_run_config(workdir: str, first_stage: str | None = None):
  """A training run's saved config.json, of either stage (see `is_ldm`).

  `first_stage` (the commands' --first_stage): where an LDM run's first stage is now, when
  it moved since training; it replaces `first_stage.path`. Other runs refuse it.
  """
  import ml_collections
  path = fs.join(workdir, "config.json")
  if not fs.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} a training workdir?")
  config = ml_collections.ConfigDict(json.loads(fs.read_text(path)))
  if first_stage:
    if not is_ldm(config):
      raise ValueError(f"--first_stage applies to LDM runs; {workdir} holds an autoencoder "
                       "run")
    config.first_stage.path = fs.absolute(first_stage)  # a gs:// URL as it is
  return config


def is_ldm(config) -> bool:
  return config.get("stage") == "ldm"


def apply_overrides(config, *, num_examples=None, split=None, batch_size=None,
                    inception_weights=None, reference_stats=None, lpips_weights=None,
                    sampler=None, steps=None, guidance=None, clip_model=None):
  """The run's config with evaluation choices replaced (None keeps the saved value).

  `lpips_weights` applies to first-stage runs, `sampler`, `steps`, `guidance`
  (config.sample.*) and `clip_model` to LDM runs; given for the other kind they are an
  error ("" for clip_model turns a saved one off).
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
  if clip_model is not None:
    if not is_ldm(config) and clip_model:
      raise ValueError("clip_model scores LDM samples against their captions; this is a "
                       "first-stage run")
    config.eval.clip_model = fs.absolute(clip_model) if clip_model else ""
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


def num_images(data, split: str, limit: int | None) -> int:
  """How many records of `split` of `data` (a data.spec.DataSpec) an evaluation of at
  most `limit` (None = all) reads."""
  from ldm_jax.data.sources import make_source
  total = len(make_source(data, split))
  return min(total, limit) if limit else total


def make_report(step: int, split: str, metrics: dict, has_ema: bool, config, **extra) -> dict:
  """The JSON report of either stage: what was scored, with which weights and files."""
  return {
      "step": step, "split": split, "num_examples": metrics["num_examples"],
      "metrics": {k: v for k, v in metrics.items() if k != "num_examples"},
      "weights": "ema" if has_ema else "trained", **extra,
      "inception_weights": config.eval.inception_weights,
      "reference_stats": config.eval.reference_stats,
      **({"clip_model": config.eval.clip_model} if "clip_score" in metrics else {}),
      "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def publish(workdir: str, report: dict) -> None:
  """The report's JSON and markdown (process 0) and its metrics as `eval/` scalars."""
  import jax
  if jax.process_index() == 0:
    write_reports(workdir, report)
  writer = fs.metric_writer(fs.join(workdir, "eval"), just_logging=jax.process_index() > 0)
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


def report_paths(workdir: str, step: int) -> tuple[str, str]:
  base = fs.join(workdir, "eval", f"step_{step:07d}")
  return base + ".json", base + ".md"


def check_reports(workdir: str, step: int) -> None:
  """Fails (outputs.OutputError) before an evaluation whose reports could not be written:
  a previous report of the step is replaced, a file ldm_jax did not write is not."""
  from ldm_jax import outputs
  for path in report_paths(workdir, step):
    outputs.check_target(path, outputs.EVAL_REPORT)


def write_reports(workdir: str, report: dict) -> tuple[str, str]:
  from ldm_jax import outputs
  json_path, md_path = report_paths(workdir, report["step"])
  outputs.write_json(json_path, report, outputs.EVAL_REPORT)
  outputs.write_markdown(md_path, markdown_table(report), outputs.EVAL_REPORT)
  logging.info("wrote %s and %s", json_path, md_path)
  return json_path, md_path
