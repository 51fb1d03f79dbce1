"""First-stage training: `train_and_evaluate(config, workdir)`.

Everything that can be wrong with the config, the data or the weights is checked before
anything is compiled. The loop resumes from the newest checkpoint in `workdir`, saves one
when it receives SIGTERM (preemption), evaluates on the held-out split, and exports the
(EMA) weights for PyTorch at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metric_writers, periodic_actions
from flax import nnx

from ldm_jax.convert import load_autoencoder, save_autoencoder
from ldm_jax.convert.files import WeightFileError
from ldm_jax.convert.torch_layout import StateMismatchError
from ldm_jax.data.pipeline import data_report, eval_batches, skipped_records, train_iterator
from ldm_jax.data.sources import check_data
from ldm_jax.eval.reconstruction import ReconstructionEvaluator, summary_line
from ldm_jax.eval.setup import eval_networks
from ldm_jax.logs import line_notes
from ldm_jax.losses.autoencoder import LossConfig
from ldm_jax.models.autoencoder import AutoencoderSpec, build_autoencoder
from ldm_jax.models.lpips import make_lpips
from ldm_jax.train import autoencoder_step as step_lib
from ldm_jax.train import checkpoint, mesh as mesh_lib, resume
from ldm_jax.train.images import save_grid
from ldm_jax.train.autoencoder_setup import build_programs, check_config
from ldm_jax.train.optim import learning_rate
from ldm_jax.train.guard import NonFiniteGuard, guard_settings
from ldm_jax.train.preemption import PreemptionFlag

@dataclasses.dataclass
class Run:
  """Everything built from the config before the loop starts."""

  config: ml_collections.ConfigDict
  workdir: str
  spec: AutoencoderSpec
  loss: LossConfig
  mesh: Any
  programs: step_lib.Programs
  lpips_state: Any
  eval_lpips: Any
  inception: Any
  reference_stats: Any
  global_batch: int
  accumulate: int


def build_run(config: ml_collections.ConfigDict, workdir: str) -> Run:
  spec, loss = check_config(config)
  mesh = mesh_lib.make_mesh(config.train.mesh)
  global_batch = int(config.data.batch_size)
  mesh_lib.check_batch(global_batch, mesh)
  check_data(config.data)
  lpips_model = None
  if loss.perceptual_weight > 0:
    lpips_model = make_lpips(loss.lpips_weights, loss.lpips_random_init)
  elif loss.lpips_weights:
    lpips_model = make_lpips(loss.lpips_weights)  # for the validation metric only
  logging.info("learning rate %.3g (base %.3g, scale_lr=%s)",
               learning_rate(config.optim, global_batch), config.optim.base_learning_rate,
               config.optim.scale_lr)
  lpips_def, lpips_state = (nnx.split(lpips_model) if lpips_model is not None
                            else (None, None))
  use_lpips_loss = loss.perceptual_weight > 0
  _, programs = build_programs(config, lpips_def if use_lpips_loss else None)
  inception, reference = eval_networks(config)
  return Run(config, workdir, spec, loss, mesh, programs,
             lpips_state if use_lpips_loss else None, lpips_model, inception, reference,
             global_batch, int(config.optim.accumulate_grad_batches))


def initial_state(run: Run) -> step_lib.TrainState:
  seed = int(run.config.train.seed)
  if run.config.train.init_from:
    try:
      model = load_autoencoder(run.config.train.init_from, run.spec)
    except (WeightFileError, StateMismatchError) as e:  # before the workdir is made
      raise WeightFileError(f"train.init_from={run.config.train.init_from}: {e}") from None
  else:
    model = build_autoencoder(run.spec, nnx.Rngs(seed))
  disc = step_lib.build_discriminator(run.loss, run.spec.dtype, seed)
  return step_lib.new_state(model, disc, run.programs, bool(run.config.train.decoder_only),
                            seed)


def _next_update_batch(iterator, accumulate: int, sharding, global_shape) -> dict:
  local = np.stack([next(iterator)["image"] for _ in range(accumulate)])
  return {"image": jax.make_array_from_process_local_data(sharding, local, global_shape)}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) until config.train.num_steps; returns the last validation metrics.

  Nothing is written to `workdir` until the config is known to continue the run there
  (`resume.check_resume`), the data and weights are checked, and the initial state (with
  `train.init_from`) is built; config.json is replaced only after a successful restore.
  """
  config = resume.prepare(config, workdir)
  run = build_run(config, workdir)
  check_export_target(workdir, config)
  state = initial_state(run)
  nonfinite = NonFiniteGuard(step_lib.GUARDED, *guard_settings(config))

  os.makedirs(workdir, exist_ok=True)
  shardings = mesh_lib.state_shardings(run.mesh, state)
  state = jax.device_put(state, shardings)
  iterator = train_iterator(config.data, global_batch_size=run.global_batch,
                            seed=int(config.data.seed))
  manager = checkpoint.make_manager(workdir, int(config.train.keep_checkpoints))
  last_saved = manager.latest_step()
  if last_saved is not None:
    logging.info("resuming from the checkpoint at step %d", last_saved)
    state = checkpoint.restore(manager, last_saved, checkpoint.abstract_with_shardings(
        state, shardings), iterator)
  resume.write_config(config, workdir)

  batch_sharding = mesh_lib.batch_sharding(run.mesh, leading_dims=1)
  size = int(config.data.image_size)
  global_shape = (run.accumulate, run.global_batch, size, size, 3)
  train_step = step_lib.jit_train_step(run.programs, run.mesh, shardings, run.lpips_state)
  evaluator = Evaluator(run)

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  num_steps = int(config.train.num_steps)
  progress = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                             every_steps=int(config.train.log_every))
  preemption = PreemptionFlag()
  step = int(jax.device_get(state.step))
  first_step = step
  totals, count, t_log, last_eval = None, 0, time.time(), {}
  if step == 0:
    last_eval = evaluator(state, step, writer)
  try:
    while step < num_steps:
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = _next_update_batch(iterator, run.accumulate, batch_sharding, global_shape)
        state, step_metrics = train_step(state, batch, run.lpips_state)
      step += 1
      nonfinite.add(step_metrics.pop("guard"))
      totals = step_metrics if totals is None else jax.tree.map(jnp.add, totals, step_metrics)
      count += 1
      progress(step)
      log_due = step % int(config.train.log_every) == 0 or step == num_steps
      save_due = step % int(config.train.ckpt_every) == 0 or step == num_steps
      preempted = preemption.requested()
      if log_due or save_due or preempted:  # the loop syncs here anyway
        nonfinite.check(step, last_saved)  # raises before a bad state is saved or exported
      if log_due:
        scalars = {f"train/{k}": float(v) / count for k, v in jax.device_get(totals).items()}
        elapsed = time.time() - t_log
        scalars["train/learning_rate"] = learning_rate(config.optim, run.global_batch)
        scalars["train/skipped_nonfinite"] = nonfinite.skipped
        scalars["data/skipped_records"] = skipped_records()
        writer.write_scalars(step, scalars)
        _console_line(step, num_steps, count / elapsed,
                      count * run.global_batch * run.accumulate / elapsed, scalars,
                      line_notes(nonfinite.note(), data_report()))
        totals, count, t_log = None, 0, time.time()
      if step % int(config.train.eval_every) == 0 or step == num_steps:
        last_eval = evaluator(state, step, writer)
      saved = False
      if save_due:
        saved = checkpoint.save(manager, step, state, iterator)
        last_saved = step if saved else last_saved
      if preempted:
        if not saved:
          checkpoint.save(manager, step, state, iterator, force=True)
        manager.wait_until_finished()
        logging.warning("preempted: checkpoint saved at step %d; rerun the same command to "
                        "resume", step)
        return last_eval
  finally:
    preemption.restore()
    manager.wait_until_finished()
    writer.flush()
  if step > first_step or not os.path.exists(export_path(workdir, config)):
    export(run, state, workdir)
  return last_eval


def _console_line(step, num_steps, steps_per_s, images_per_s, scalars, note=""):
  eta = (num_steps - step) / max(steps_per_s, 1e-9)
  loss_keys = ("total_loss", "rec_loss", "kl_loss", "quant_loss", "g_loss", "disc_loss")
  losses = " ".join(f"{k}={scalars[f'train/{k}']:.4g}" for k in loss_keys
                    if f"train/{k}" in scalars)
  logging.info("step %d/%d | %.2f steps/s | %.1f img/s | ETA %s | %s%s", step, num_steps,
               steps_per_s, images_per_s, time.strftime("%H:%M:%S", time.gmtime(eta)), losses,
               note)


def export_path(workdir: str, config) -> str:
  fmt = config.train.export_format
  return os.path.join(workdir, "export", "autoencoder" + (".safetensors" if fmt == "compvis"
                                                         else ""))


def check_export_target(workdir: str, config) -> None:
  """Fails before training when the end-of-run export could not replace what is there."""
  from ldm_jax.outputs import check_target
  check_target(export_path(workdir, config), "autoencoder")


def export(run: Run, state: step_lib.TrainState, workdir: str) -> str | None:
  """Writes the EMA (else the trained) weights for PyTorch; returns the path."""
  if jax.process_index() != 0:
    return None
  model = step_lib.eval_model(run.programs, jax.device_get(state))
  path = export_path(workdir, run.config)
  save_autoencoder(model, path, format=run.config.train.export_format)
  logging.info("exported %s weights to %s", run.config.train.export_format, path)
  return path


class Evaluator:
  """Validation on `train.eval_examples` images: PSNR / SSIM (/ LPIPS) mean and std over
  images, rFID when Inception weights are configured, and an image grid. The numbers come
  from `eval.reconstruction`, the code `python -m ldm_jax.evaluate` runs."""

  def __init__(self, run: Run):
    self.run = run
    config = run.config
    examples = int(config.train.get("eval_examples", 64))
    self.batches = list(eval_batches(config.data, config.data.val_split,
                                     batch_size=run.global_batch, max_examples=examples))
    if not self.batches:
      raise ValueError(f"the validation split {config.data.val_split!r} is empty")
    self.evaluator = ReconstructionEvaluator(
        run.programs, run.spec.kind, run.mesh, lpips_model=run.eval_lpips,
        inception=run.inception, reference=run.reference_stats)

  def __call__(self, state, step: int, writer) -> dict:
    out = self.evaluator.evaluate(state, self.batches)
    result = {k: v for k, v in out.metrics.items() if k != "num_examples"}
    writer.write_scalars(step, {f"val/{k}": v for k, v in result.items()})
    if jax.process_index() == 0:
      writer.write_images(step, {"val/input_reconstruction_sample": _tile(out.grid)[None]})
      save_grid(_tile(out.grid), os.path.join(self.run.workdir, "images", f"val_{step:07d}.png"))
    logging.info("validation at step %d: %s", step, summary_line(result))
    if jax.process_index() == 0:
      with open(os.path.join(self.run.workdir, "val_metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, **result}) + "\n")
    return result


def _tile(rows: np.ndarray, max_rows: int = 8) -> np.ndarray:
  """[B, H, W', 3] in [-1, 1] -> one uint8 image with the rows stacked."""
  rows = rows[:max_rows]
  image = np.concatenate(list(rows), axis=0)
  return np.clip((image + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
