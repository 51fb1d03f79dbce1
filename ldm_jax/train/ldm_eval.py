"""An LDM run's FID / IS: the sample function `eval.generation` takes, the trainer's
periodic evaluation and the scoring of a workdir's checkpoint (`python -m
ldm_jax.evaluate` on an LDM run).

Samples come from the run's compiled sampler (`ldm_trainer.make_sampler`: EMA weights, the
config's `sample.sampler / steps / eta / guidance_scale`), each batch conditioned on what
`ldm_trainer.sampler_fields` reads off it (inpainting masks drawn from the batch index).
"""

from __future__ import annotations

import dataclasses

import jax
from absl import logging

from ldm_jax.eval.generation import GenerationEvaluator, is_splits
from ldm_jax.eval.reconstruction import summary_line
from ldm_jax.eval.setup import eval_clip_scorer, eval_config, eval_networks
from ldm_jax.train import ldm_trainer
from ldm_jax import mesh as mesh_lib


def sample_fn(run: ldm_trainer.LDMRun, tile: int = 0, overlap: float = 0.25):
  """`sample_fn(state, batch, index, key, num)` for `GenerationEvaluator`; `tile` (pixels):
  the first stage decodes the samples in overlapping tiles (`make_sampler`)."""
  sampler = ldm_trainer.make_sampler(run, tile=tile, overlap=overlap)
  sharding = mesh_lib.batch_sharding(run.mesh)
  first_stage_state = jax.device_put(run.first_stage_state, mesh_lib.replicated(run.mesh))

  def sample(state, batch, index, key, num):
    fields = mesh_lib.global_batch(ldm_trainer.sampler_fields(run, batch, seed=index),
                                   sharding)
    return sampler(state, fields, first_stage_state, key, num=num)

  return sample


def evaluator(run: ldm_trainer.LDMRun, inception, reference=None, tile: int = 0,
              overlap: float = 0.25, clip_scorer=None) -> GenerationEvaluator:
  return GenerationEvaluator(sample_fn(run, tile, overlap), run.mesh,
                             mesh_lib.batch_sharding(run.mesh), inception, reference,
                             clip_scorer=clip_scorer)


def _clip_scorer(run: ldm_trainer.LDMRun):
  """eval.clip_model's scorer, or None; only text runs have captions to score against."""
  if not eval_config(run.config).clip_model:
    return None
  if run.config.cond.kind not in ("text", "clip"):
    raise ValueError(f"eval.clip_model (--clip_model) scores samples against their "
                     f"captions; this run has cond.kind={run.config.cond.kind!r}")
  return eval_clip_scorer(run.config, run.mesh)


def _batches(run: ldm_trainer.LDMRun, limit: int | None, captions: bool = False):
  from ldm_jax.data.pipeline import eval_batches
  from ldm_jax.train.ldm_setup import condition_spec
  conditions = condition_spec(run.config)
  if captions:  # the raw text, for the CLIP folder's own tokenizer (not the run's)
    conditions = dataclasses.replace(conditions, fields=conditions.fields + ("caption",))
  return eval_batches(run.data, run.data.val_split, batch_size=run.data.batch_size,
                      max_examples=limit, conditions=conditions)


class TrainingEvaluation:
  """FID / IS on `train.eval_examples` validation examples, for the LDM trainer; built
  before anything compiles, so a missing Inception file or split stops the run first."""

  def __init__(self, run: ldm_trainer.LDMRun):
    from ldm_jax.eval.workdir import num_images
    config = run.config
    inception, reference = eval_networks(config, required=True)
    self.limit = int(config.train.eval_examples) or None
    _batches(run, self.limit)  # a bad data config raises here
    if num_images(run.data, run.data.val_split, self.limit) < 2:
      raise ValueError(f"FID during training needs at least 2 examples of the validation "
                       f"split {run.data.val_split!r} (train.eval_examples)")
    self.run = run
    self.clip = _clip_scorer(run)
    self.evaluator = evaluator(run, inception, reference, clip_scorer=self.clip)

  def __call__(self, state, step: int, writer) -> dict[str, float]:
    out = self.evaluator.evaluate(state, _batches(self.run, self.limit, self.clip is not None))
    scalars = {f"eval/{k}": v for k, v in out.metrics.items() if k != "num_examples"}
    writer.write_scalars(step, scalars)
    logging.info("samples at step %d: %s", step, summary_line(out.metrics))
    return scalars


def training_evaluation(run: ldm_trainer.LDMRun) -> TrainingEvaluation | None:
  """The trainer's FID / IS hook; None when `eval.inception_weights` is not set."""
  if not eval_config(run.config).inception_weights:
    return None
  return TrainingEvaluation(run)


def evaluate_ldm_workdir(workdir: str, config, step: int | None = None, *, tile: int = 0,
                         overlap: float = 0.25) -> dict:
  """Scores an LDM workdir's checkpoint under `config` (its config.json with
  `workdir.apply_overrides`); writes the reports; returns them. `tile`: decode the samples
  in overlapping tiles of that many pixels."""
  import tqdm

  from ldm_jax.eval.workdir import make_report, num_images, publish
  from ldm_jax.train import checkpoint
  from ldm_jax.train.ldm_setup import abstract_state

  # Without the network there is nothing to report: fail before building anything.
  inception, reference = eval_networks(config, required=True)
  run = ldm_trainer.build_run(config, workdir, check_training_data=False)
  factor = run.first_stage.spec.downsample_factor
  if tile % factor:
    raise ValueError(f"--tile={tile} must be a multiple of the first stage's downsampling "
                     f"factor {factor}")
  clip = _clip_scorer(run)  # a bad --clip_model fails before the restore
  abstract = abstract_state(config, run.spec, run.programs)
  target = checkpoint.abstract_with_shardings(abstract,
                                              run.layout.state_shardings(abstract))
  state, step = checkpoint.restore_state_only(workdir, target, step)
  split = run.data.val_split
  limit = int(config.eval.num_examples) or None
  batches = _batches(run, limit, captions=clip is not None)
  total = num_images(run.data, split, limit)
  sample = config.sample
  logging.info("evaluating step %d: %d samples (%s, %d steps, guidance %g), one per example "
               "of %r, against %s", step, total, sample.sampler, sample.steps,
               sample.guidance_scale, split,
               config.eval.reference_stats or "the real images of the same examples")
  scorer = evaluator(run, inception, reference, tile, overlap, clip_scorer=clip)
  bar = tqdm.tqdm(total=total, unit="img", desc="sample + score",
                  disable=jax.process_index() > 0)
  with bar:
    out = scorer.evaluate(state, batches, progress=bar.update)
  metrics = out.metrics
  logging.info("step %d: %s", step, summary_line(metrics))
  report = make_report(
      step, split, metrics, state.ema is not None, config, sampler=sample.sampler,
      steps=int(sample.steps), eta=float(sample.eta), guidance=float(sample.guidance_scale),
      is_splits=is_splits(metrics["num_examples"]), seed=scorer.seed,
      batch_size=run.global_batch, **({"tile": tile, "tile_overlap": overlap} if tile else {}))
  publish(workdir, report)
  return report
