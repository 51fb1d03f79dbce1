"""FID and Inception Score of generated samples: one sample per example of a split, drawn
under that example's own condition (its label, its caption, its concat input — whatever
the caller's `sample_fn` reads off the batch), so the samples follow the split's
distribution of conditions and FID compares like with like.

The evaluator takes a function, never a trainer: `sample_fn(state, batch, index, key,
num)` returns `num` images in [-1, 1] (a global array) for batch `index` of the stream.
Batch i draws from `fold_in(key(seed), i)`, so the same checkpoint, split and batch size
give the same samples and the same numbers on every run. The samples' InceptionV3 pool
features are accumulated in float64 (`fid.FeatureStats`) against reference statistics
when given, else against the real images of the same batches through the same network;
the Inception Score is taken over the samples' bias-free logits. Padding (`eval_batches`'
mask) is excluded from both.

The LDM trainer's periodic evaluation and `python -m ldm_jax.evaluate` on an LDM workdir
(both in `ldm_jax.train.ldm_eval`) build the sample function and run this.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import jax
import numpy as np

from ldm_jax.eval import fid as fid_lib
from ldm_jax.eval.clip_score import clip_score
from ldm_jax.eval.streaming import InceptionForward, MeanStd, image_batch

SEED = 0
IS_SPLITS = 10  # the usual number


def is_splits(count: int) -> int:
  """10 splits, fewer for fewer than 20 samples: each split keeps at least 2 (the score of a
  single image is exactly 1, whatever the model)."""
  return max(1, min(IS_SPLITS, count // 2))


@dataclasses.dataclass
class Result:
  metrics: dict[str, float]  # fid, is, is_std, num_examples (+ clip_score, clip_score_std)
  sample_stats: fid_lib.FeatureStats
  real_stats: fid_lib.FeatureStats | None  # None when reference statistics were given
  logits: np.ndarray  # [n, 1008] bias-free logits of the samples, in batch order
  clip_scores: np.ndarray | None = None  # [n] 100 * cos per sample (unclamped), batch order


class GenerationEvaluator:
  """Built once per run (the sampler and the Inception pass compile on first use); call
  `evaluate` with any state of that run."""

  def __init__(self, sample_fn: Callable[..., jax.Array], mesh, batch_sharding: Any,
               inception, reference: tuple[np.ndarray, np.ndarray] | None = None,
               seed: int = SEED, clip_scorer=None):
    """`batch_sharding`: how a global batch lies on `mesh` (the real images are put there
    for their Inception pass). `clip_scorer`: an `eval.clip_score.CLIPScorer` (built on the
    same mesh), or None for no CLIP score."""
    self.sample_fn = sample_fn
    self.clip_scorer = clip_scorer
    self.seed = seed
    self.reference = reference
    self.sharding = batch_sharding
    self.inception = InceptionForward(inception, mesh, ("pool", "logits_unbiased"))

  def key(self, batch_index: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(self.seed), batch_index)

  def evaluate(self, state, batches: Iterable[dict],
               progress: Callable[[int], None] | None = None) -> Result:
    """Streams `batches` (per host, as `eval_batches` yields them with the condition
    fields `sample_fn` reads); one sample per real (mask True) example."""
    sample_stats = fid_lib.FeatureStats()
    real_stats = fid_lib.FeatureStats() if self.reference is None else None
    clip_stats = MeanStd() if self.clip_scorer is not None else None
    logits, clip_values = [], []
    for i, batch in enumerate(batches):
      real, mask = image_batch(batch, self.sharding)
      images = self.sample_fn(state, batch, i, self.key(i), real.shape[0])
      out = self.inception(images)
      sample_stats.update(out["pool"], mask)
      logits.append(out["logits_unbiased"][mask])
      if clip_stats is not None:
        values = self.clip_scorer.scores(images, self._clip_ids(batch))
        clip_stats.update(values, mask)
        clip_values.append(values[mask])
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
    clip_values = np.concatenate(clip_values) if clip_stats is not None else None
    if clip_stats is not None:
      # The std is over samples (as PSNR's is over images), of the unclamped values.
      metrics.update(clip_score=clip_score(clip_stats), clip_score_std=clip_stats.std())
    return Result(metrics, sample_stats, real_stats, logits, clip_values)

  def _clip_ids(self, batch: dict):
    """This host's captions as the CLIP tokenizer's ids, one global array over the batch."""
    if "clip_tokens" in batch:
      ids = np.asarray(batch["clip_tokens"], np.int32)
    elif "caption" in batch:
      ids = self.clip_scorer.tokenize(batch["caption"])
    else:
      raise ValueError("a CLIP score needs each example's caption: the evaluation batches "
                       f"carry {sorted(batch)}, without a 'caption' (or 'clip_tokens') field; "
                       "CLIP scores apply to text-conditioned runs")
    return jax.make_array_from_process_local_data(self.sharding, ids)
