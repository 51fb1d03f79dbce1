"""FID and Inception Score of an LDM's samples: one sample per example of a split, drawn
under that example's own condition (its label, its caption, whatever
`ldm_trainer.sampler_fields` reads off the batch), so the samples follow the split's
distribution of conditions and FID compares like with like.

Samples come from the run's compiled sampler (`ldm_trainer.make_sampler`: EMA weights, the
config's `sample.sampler / steps / eta / guidance_scale`); batch i draws its noise from
`fold_in(key(seed), i)`, so the same checkpoint, split and batch size give the same
samples and the same numbers on every run. The samples' InceptionV3 pool features are
accumulated in float64 (`fid.FeatureStats`) against `eval.reference_stats` when given,
else against the real images of the same batches through the same network; the Inception
Score is taken over the samples' bias-free logits. Padding (`eval_batches`' mask) is
excluded from both.

The trainer's periodic evaluation (`training_evaluation`) and `python -m ldm_jax.evaluate`
on an LDM workdir (`evaluate_ldm_workdir`) both run `GenerationEvaluator`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import jax
import numpy as np
from absl import logging

from ldm_jax.eval import fid as fid_lib
from ldm_jax.eval.reconstruction import summary_line
from ldm_jax.eval.setup import eval_config, eval_networks
from ldm_jax.eval.streaming import InceptionForward, image_batch
from ldm_jax.train import ldm_trainer
from ldm_jax.train import mesh as mesh_lib

SEED = 0
IS_SPLITS = 10  # the usual number


def is_splits(count: int) -> int:
  """10 splits, fewer for fewer than 20 samples: each split keeps at least 2 (the score of a
  single image is exactly 1, whatever the model)."""
  return max(1, min(IS_SPLITS, count // 2))


@dataclasses.dataclass
class Result:
  metrics: dict[str, float]  # fid, is, is_std, num_examples
  sample_stats: fid_lib.FeatureStats
  real_stats: fid_lib.FeatureStats | None  # None when reference statistics were given
  logits: np.ndarray  # [n, 1008] bias-free logits of the samples, in batch order


class GenerationEvaluator:
  """Built once per run (the sampler and the Inception pass compile on first use); call
  `evaluate` with any state of that run."""

  def __init__(self, run: ldm_trainer.LDMRun, inception,
               reference: tuple[np.ndarray, np.ndarray] | None = None, seed: int = SEED):
    self.run = run
    self.seed = seed
    self.reference = reference
    self.sharding = mesh_lib.batch_sharding(run.mesh)
    self.sampler = ldm_trainer.make_sampler(run)
    self.first_stage_state = jax.device_put(run.first_stage_state,
                                            mesh_lib.replicated(run.mesh))
    self.inception = InceptionForward(inception, run.mesh, ("pool", "logits_unbiased"))

  def key(self, batch_index: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(self.seed), batch_index)

  def evaluate(self, state, batches: Iterable[dict],
               progress: Callable[[int], None] | None = None) -> Result:
    """Streams `batches` (per host, as `eval_batches` yields them with the run's
    condition fields); one sample per real (mask True) example."""
    sample_stats = fid_lib.FeatureStats()
    real_stats = fid_lib.FeatureStats() if self.reference is None else None
    logits = []
    for i, batch in enumerate(batches):
      real, mask = image_batch(batch, self.sharding)
      fields = mesh_lib.global_batch(ldm_trainer.sampler_fields(self.run, batch, seed=i),
                                     self.sharding)
      images = self.sampler(state, fields, self.first_stage_state, self.key(i),
                            num=real.shape[0])
      out = self.inception(images)
      sample_stats.update(out["pool"], mask)
      logits.append(out["logits_unbiased"][mask])
      if real_stats is not None:
        real_stats.update(self.inception(real)["pool"], mask)
      if progress is not None:
        progress(int(mask.sum()))
    count = sample_stats.count
    if count < 2:
      raise ValueError(f"FID needs at least 2 samples, got {count}: the split is empty or "
                       "too small, or its records were undecodable")
    logits = np.concatenate(logits)
    score, score_std = fid_lib.inception_score(logits, splits=is_splits(count))
    fid = fid_lib.fid_from_stats(
        sample_stats, self.reference if self.reference is not None else real_stats)
    metrics = {"num_examples": count, "fid": fid, "is": score, "is_std": score_std}
    return Result(metrics, sample_stats, real_stats, logits)


def _batches(config, limit: int | None):
  from ldm_jax.data.pipeline import eval_batches
  from ldm_jax.train.ldm_setup import condition_spec
  return eval_batches(config.data, config.data.val_split, batch_size=int(config.data.batch_size),
                      max_examples=limit, conditions=condition_spec(config))


class TrainingEvaluation:
  """FID / IS on `train.eval_examples` validation examples, for the LDM trainer; built
  before anything compiles, so a missing Inception file or split stops the run first."""

  def __init__(self, run: ldm_trainer.LDMRun):
    from ldm_jax.eval.workdir import num_images
    config = run.config
    inception, reference = eval_networks(config, required=True)
    self.limit = int(config.train.eval_examples) or None
    _batches(config, self.limit)  # a bad data config raises here
    if num_images(config.data, config.data.val_split, self.limit) < 2:
      raise ValueError(f"FID during training needs at least 2 examples of the validation "
                       f"split {config.data.val_split!r} (train.eval_examples)")
    self.config = config
    self.evaluator = GenerationEvaluator(run, inception, reference)

  def __call__(self, state, step: int, writer) -> dict[str, float]:
    out = self.evaluator.evaluate(state, _batches(self.config, self.limit))
    scalars = {f"eval/{k}": v for k, v in out.metrics.items() if k != "num_examples"}
    writer.write_scalars(step, scalars)
    logging.info("samples at step %d: %s", step, summary_line(out.metrics))
    return scalars


def training_evaluation(run: ldm_trainer.LDMRun) -> TrainingEvaluation | None:
  """The trainer's FID / IS hook; None when `eval.inception_weights` is not set."""
  if not eval_config(run.config).inception_weights:
    return None
  return TrainingEvaluation(run)


def evaluate_ldm_workdir(workdir: str, config, step: int | None = None) -> dict:
  """Scores an LDM workdir's checkpoint under `config` (its config.json with
  `workdir.apply_overrides`); writes the reports; returns them."""
  import tqdm

  from ldm_jax.eval.workdir import make_report, num_images, publish
  from ldm_jax.train import checkpoint
  from ldm_jax.train.ldm_setup import abstract_state

  # Without the network there is nothing to report: fail before building anything.
  inception, reference = eval_networks(config, required=True)
  run = ldm_trainer.build_run(config, workdir, check_training_data=False)
  abstract = abstract_state(config, run.spec, run.programs)
  target = checkpoint.abstract_with_shardings(abstract,
                                              mesh_lib.state_shardings(run.mesh, abstract))
  state, step = checkpoint.restore_state_only(workdir, target, step)
  split = config.data.val_split
  limit = int(config.eval.num_examples) or None
  batches = _batches(config, limit)
  total = num_images(config.data, split, limit)
  sample = config.sample
  logging.info("evaluating step %d: %d samples (%s, %d steps, guidance %g), one per example "
               "of %r, against %s", step, total, sample.sampler, sample.steps,
               sample.guidance_scale, split,
               config.eval.reference_stats or "the real images of the same examples")
  evaluator = GenerationEvaluator(run, inception, reference)
  bar = tqdm.tqdm(total=total, unit="img", desc="sample + score",
                  disable=jax.process_index() > 0)
  with bar:
    out = evaluator.evaluate(state, batches, progress=bar.update)
  metrics = out.metrics
  logging.info("step %d: %s", step, summary_line(metrics))
  report = make_report(
      step, split, metrics, state.ema is not None, config, sampler=sample.sampler,
      steps=int(sample.steps), eta=float(sample.eta), guidance=float(sample.guidance_scale),
      is_splits=is_splits(metrics["num_examples"]), seed=evaluator.seed,
      batch_size=run.global_batch)
  publish(workdir, report)
  return report
