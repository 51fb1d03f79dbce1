"""First-stage training: `train_and_evaluate(config, workdir)`, the first stage's `Stage`
for the one loop (`train.loop`).

Everything that can be wrong with the config, the data or the weights is checked before
anything is compiled. The stage brings the GAN step (accumulated micro-batches), the
validation on the held-out split (PSNR / SSIM / LPIPS / rFID and an image grid) and the
export of the (EMA) weights for PyTorch at the end, with the latent scale an LDM's
scale_by_std would measure on them (unless a fine-tune's source states one).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from ldm_jax import fs
from ldm_jax.convert import save_autoencoder
from ldm_jax.convert.autoencoder import (autoencoder_from_weights, discriminator_tensors,
                                         load_discriminator, read_autoencoder_weights)
from ldm_jax.convert.files import WeightFileError
from ldm_jax.convert.torch_layout import StateMismatchError
from ldm_jax.data.pipeline import eval_batches, train_iterator
from ldm_jax.data.sources import check_data
from ldm_jax.data.spec import DataSpec
from ldm_jax.eval.reconstruction import ReconstructionEvaluator, summary_line
from ldm_jax.eval.setup import eval_networks
from ldm_jax.losses.autoencoder import LossConfig, gan_active
from ldm_jax.models.autoencoder import AutoencoderSpec, LatentNormalization, build_autoencoder
from ldm_jax.models.lpips import make_lpips
from ldm_jax.train import autoencoder_step as step_lib
from ldm_jax.train import first_stage, loop
from ldm_jax import mesh as mesh_lib
from ldm_jax.train.autoencoder_setup import build_programs, check_config
from ldm_jax.train.images import save_grid
from ldm_jax.train.optim import learning_rate

@dataclasses.dataclass
class Run:
  """Everything built from the config before the loop starts."""

  config: ml_collections.ConfigDict
  workdir: str
  data: DataSpec  # config.data, read once here; the data functions take this
  spec: AutoencoderSpec
  loss: LossConfig
  layout: mesh_lib.Layout  # the mesh and the sharding rules (train.mesh, train.sharding_rules)
  programs: step_lib.Programs
  lpips_state: Any
  eval_lpips: Any
  inception: Any
  reference_stats: Any
  global_batch: int
  accumulate: int

  @property
  def mesh(self):
    return self.layout.mesh


def build_run(config: ml_collections.ConfigDict, workdir: str) -> Run:
  spec, loss = check_config(config)
  data = DataSpec.from_config(config.data)
  layout = mesh_lib.Layout.from_config(config.train)
  global_batch = data.batch_size
  mesh_lib.check_batch(global_batch, layout.mesh)
  check_data(data)
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
  return Run(config, workdir, data, spec, loss, layout, programs,
             lpips_state if use_lpips_loss else None, lpips_model, inception, reference,
             global_batch, int(config.optim.accumulate_grad_batches))


def initial_state(run: Run) -> step_lib.TrainState:
  """The state a new run starts from: `train.init_from`'s weights, else the seed's init.

  A CompVis / taming training checkpoint also holds the PatchGAN it was trained against
  (`loss.discriminator.*`); continuing with it (`train.init_discriminator="auto"`) spares
  a fine-tuning run the phase where a fresh discriminator's gradients are noise. On a
  resume this state is only the restore's target, so what it was loaded from is moot.
  """
  train = run.config.train
  seed = int(train.seed)
  init_from = train.init_from
  mode = train.get("init_discriminator", "auto")  # absent in configs saved before it
  disc = step_lib.build_discriminator(run.loss, run.spec.dtype, seed)
  if not init_from:
    logging.info("discriminator: fresh (train.seed=%d); autoencoder: fresh", seed)
    return step_lib.new_state(build_autoencoder(run.spec, nnx.Rngs(seed)), disc, run.programs,
                              bool(train.decoder_only), seed)
  try:  # every failure here comes before the workdir is made
    weights = read_autoencoder_weights(init_from)
    model = autoencoder_from_weights(weights, run.spec)
  except (WeightFileError, StateMismatchError) as e:
    raise WeightFileError(f"train.init_from={init_from}: {e}") from None
  disc_tensors = discriminator_tensors(weights)
  if disc_tensors and mode == "auto":
    try:
      load_discriminator(disc, disc_tensors, weights.source, {
          k: getattr(run.loss, k) for k in ("disc_in_channels", "disc_ndf",
                                            "disc_num_layers", "use_actnorm")})
    except StateMismatchError as e:
      raise WeightFileError(
          f"train.init_from={init_from}: its discriminator does not fit this config's "
          f"loss.disc_* settings. {e}\nTo continue it, set loss.disc_in_channels / "
          "loss.disc_ndf / loss.disc_num_layers / loss.use_actnorm to the file's values; "
          "to start a new one instead, set --config.train.init_discriminator=fresh.") from None
  _log_discriminator(run, init_from, disc_tensors, mode, seed)
  _check_logvar(weights, run.loss.logvar_init)
  return step_lib.new_state(model, disc, run.programs, bool(train.decoder_only), seed)


def _log_discriminator(run: Run, init_from: str, disc_tensors: dict, mode: str,
                       seed: int) -> None:
  if disc_tensors and mode == "auto":
    logging.info("discriminator: continued from %s (%d tensors, disc_ndf=%d "
                 "disc_num_layers=%d use_actnorm=%s)", init_from, len(disc_tensors),
                 run.loss.disc_ndf, run.loss.disc_num_layers, run.loss.use_actnorm)
  elif disc_tensors:
    logging.info("discriminator: fresh (train.seed=%d), by train.init_discriminator=fresh; "
                 "the one in %s is not used", seed, init_from)
  else:
    logging.info("discriminator: fresh (train.seed=%d); %s holds none", seed, init_from)


def _check_logvar(weights, logvar_init: float) -> None:
  """The reference's `loss.logvar` is a Parameter it never optimizes, so a checkpoint's
  value is the logvar_init it was trained with; ldm_jax keeps it at `loss.logvar_init`.
  A different value changes the NLL's scale (and with it the adaptive GAN weight), which
  the user should decide on, not this loader."""
  if "logvar" not in weights.loss:
    return
  found = float(np.asarray(weights.loss["logvar"]).reshape(-1)[0])
  # float32 storage: 0.1 comes back as 0.10000000149.
  if not np.isclose(found, float(logvar_init), rtol=1e-6, atol=1e-6):
    logging.warning("train.init_from=%s has loss.logvar=%g but this config's "
                    "loss.logvar_init=%g; the run keeps %g (set "
                    "--config.loss.logvar_init=%g to continue the checkpoint's)",
                    weights.source, found, logvar_init, logvar_init, found)


def _next_update_batch(iterator, accumulate: int, sharding, global_shape) -> dict:
  local = np.stack([next(iterator)["image"] for _ in range(accumulate)])
  return {"image": jax.make_array_from_process_local_data(sharding, local, global_shape)}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) until config.train.num_steps (see `train.loop`); returns the last
  training scalars and validation metrics."""
  return loop.train(config, workdir, setup,
                    export_target=lambda config: export_path(workdir, config))


def setup(config: ml_collections.ConfigDict, workdir: str) -> loop.Stage:
  """The first stage for the loop: checked, loaded and initialized (with
  `train.init_from`), the export target checked; nothing written yet."""
  run = build_run(config, workdir)
  check_export_target(workdir, config)
  state = initial_state(run)  # a missing train.init_from fails here, with its own message
  latent_scaling = init_latent_scaling(config.train, workdir)  # before anything is written
  size = run.data.image_size
  global_shape = (run.accumulate, run.global_batch, size, size, 3)

  def start(state, iterator, shardings) -> loop.Started:
    batch_sharding = run.layout.batch_sharding(leading_dims=1)
    # Two programs: without the discriminator before disc_start, with it after. jax.jit
    # compiles each on its first call, so a run compiles the second when the GAN joins.
    compiled = {gan: step_lib.jit_train_step(run.programs, run.layout, shardings,
                                             run.lpips_state, gan=gan)
                for gan in (False, True)}

    def train_step(state, step):
      batch = _next_update_batch(iterator, run.accumulate, batch_sharding, global_shape)
      gan = gan_active(run.programs.loss, step)
      return compiled[gan](state, batch, run.lpips_state)

    if config.train.init_from:  # the workdir exists now; the source may not stay
      record_latent_scaling(workdir, latent_scaling)
    actions = [(int(config.train.eval_every), Evaluator(run))]
    if measures_latent_scale(latent_scaling):
      # Every action runs at the last step; this one runs only then.
      actions.append((max(int(config.train.num_steps), 1), LatentScale(run)))
    return loop.Started(state, train_step, actions)

  lr = learning_rate(config.optim, run.global_batch)
  return loop.Stage(
      name="autoencoder", layout=run.layout, state=state, guarded=step_lib.GUARDED,
      make_iterator=lambda: train_iterator(run.data, global_batch_size=run.global_batch,
                                           seed=run.data.seed),
      images_per_step=run.global_batch * run.accumulate, learning_rate=lambda step: lr,
      start=start, console_keys=CONSOLE_KEYS, export=lambda state: export(run, state, workdir),
      export_exists=lambda: fs.exists(export_path(workdir, config)))


CONSOLE_KEYS = ("total_loss", "rec_loss", "pixel_loss", "kl_loss", "quant_loss", "g_loss",
                "disc_loss")


def export_path(workdir: str, config) -> str:
  fmt = config.train.export_format
  return fs.join(workdir, "export", "autoencoder" + (".safetensors" if fmt == "compvis"
                                                         else ""))


def check_export_target(workdir: str, config) -> None:
  """Fails before training when the end-of-run export could not replace what is there."""
  from ldm_jax.outputs import check_target
  check_target(export_path(workdir, config), "autoencoder")


LATENT_SCALING_FILE = "latent_scaling.json"
# The record's note that its scale was measured here (`LatentScale`), not stated by a source.
MEASURED = "scale_by_std"


def init_latent_scaling(train_config, workdir: str | None = None) -> dict:
  """The latent normalization a fine-tune's source folder states (`train.init_from`, a
  diffusers folder: SDXL's scale, SD3's and FLUX.1's scale and shift, force_upcast), as
  `save_autoencoder` keywords: fine-tuning keeps the latent space, so exports say so too.

  A run records what it read in `workdir/latent_scaling.json` (`record_latent_scaling`),
  and that record wins: the source may have moved by the time the run is exported. A
  source that is gone with no record is an error, never a silent default scale."""
  from ldm_jax.convert.autoencoder import diffusers_latent_scaling
  if workdir is not None and fs.exists(fs.join(workdir, LATENT_SCALING_FILE)):
    return json.loads(fs.read_text(fs.join(workdir, LATENT_SCALING_FILE)))
  source = train_config.get("init_from", "")
  if not source:
    return {}
  if not fs.exists(source):
    raise FileNotFoundError(
        f"train.init_from={source} is gone and the run recorded no {LATENT_SCALING_FILE}, "
        "so the latent scale and shift its export should state are unknown: put the source "
        "back (or its config.json), or write that file in the workdir as "
        '{"scaling_factor": ..., "shift_factor": ...}')
  return diffusers_latent_scaling(source) or {}


def record_latent_scaling(workdir: str, scaling: dict) -> None:
  """Keeps what `init_latent_scaling` read (or `LatentScale` measured) beside the
  checkpoints (process 0)."""
  if jax.process_index() == 0:
    fs.replace_text(fs.join(workdir, LATENT_SCALING_FILE), json.dumps(scaling, indent=2))


def measures_latent_scale(scaling: dict) -> bool:
  """Whether the run measures its latent scale: when no source stated one (a run from
  random init, or from a file without config.json), or when it measured it before."""
  return "scaling_factor" not in scaling or MEASURED in scaling


class LatentScale:
  """scale_by_std on the trained (EMA) weights, at the last step: `first_stage.scale_by_std`
  on the first batch of the run's training data with `key(train.seed)`, what an LDM on
  this autoencoder with the same data config and seed computes at its step 0. The export
  states it as `scaling_factor` (instead of SD's 0.18215, which fits SD's VAE only).

  Every process takes part (the batch spans hosts); process 0 records the scale in
  latent_scaling.json, where a later export reads it too."""

  def __init__(self, run: Run):
    self.run = run
    programs = run.programs
    self.measure = jax.jit(lambda state, batch, rng: first_stage.scale_by_std(
        step_lib.eval_model(programs, state), batch, rng)[0])

  def __call__(self, state, step: int, writer) -> dict | None:
    run = self.run
    if step != int(run.config.train.num_steps):
      return None
    # A fresh iterator's first batch: the one an LDM's iterator starts with.
    local = next(train_iterator(run.data, global_batch_size=run.global_batch,
                                seed=run.data.seed))["image"]
    size = run.data.image_size
    images = jax.make_array_from_process_local_data(
        run.layout.batch_sharding(), local, (run.global_batch, size, size, 3))
    seed = int(run.config.train.seed)
    scale = float(self.measure(state, {"image": images},
                               jax.random.key_data(jax.random.key(seed))))
    if not np.isfinite(scale):
      logging.warning("scale_by_std: the first batch's latents give a non-finite scale "
                      "(%s); the export states none", scale)
      return None
    logging.info("scale_by_std on the trained weights: scaling_factor = %.5f", scale)
    record_latent_scaling(run.workdir, {"scaling_factor": scale, MEASURED: {
        "step": step, "images": run.global_batch, "seed": seed}})
    writer.write_scalars(step, {"latent/scaling_factor": scale})
    return {"latent/scaling_factor": scale}


def export(run: Run, state: step_lib.TrainState, workdir: str) -> str | None:
  """Writes the EMA (else the trained) weights for PyTorch; returns the path."""
  if jax.process_index() != 0:
    return None
  model = step_lib.eval_model(run.programs, jax.device_get(state))
  path = export_path(workdir, run.config)
  save_autoencoder(model, path, format=run.config.train.export_format,
                   normalization=LatentNormalization.from_config(
                       init_latent_scaling(run.config.train, workdir)))
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
    self.batches = list(eval_batches(run.data, run.data.val_split,
                                     batch_size=run.global_batch, max_examples=examples))
    if not self.batches:
      raise ValueError(f"the validation split {run.data.val_split!r} is empty")
    self.evaluator = ReconstructionEvaluator(
        step_lib.reconstruct_fn(run.programs), mesh_lib.batch_sharding(run.mesh),
        lpips_model=run.eval_lpips, inception=run.inception, reference=run.reference_stats)

  def __call__(self, state, step: int, writer) -> dict:
    out = self.evaluator.evaluate(state, self.batches)
    result = {k: v for k, v in out.metrics.items() if k != "num_examples"}
    writer.write_scalars(step, {f"val/{k}": v for k, v in result.items()})
    if jax.process_index() == 0:
      writer.write_images(step, {"val/input_reconstruction_sample": _tile(out.grid)[None]})
      save_grid(_tile(out.grid), fs.join(self.run.workdir, "images", f"val_{step:07d}.png"))
    logging.info("validation at step %d: %s", step, summary_line(result))
    if jax.process_index() == 0:
      fs.append_text(fs.join(self.run.workdir, "val_metrics.jsonl"),
                     json.dumps({"step": step, **result}) + "\n")
    return result


def _tile(rows: np.ndarray, max_rows: int = 8) -> np.ndarray:
  """[B, H, W', 3] in [-1, 1] -> one uint8 image with the rows stacked."""
  rows = rows[:max_rows]
  image = np.concatenate(list(rows), axis=0)
  return np.clip((image + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
