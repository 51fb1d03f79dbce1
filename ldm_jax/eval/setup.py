"""The `eval` config block: which networks and reference statistics evaluation uses.

    config.eval.inception_weights  FID Inception safetensors (made by
                                   ldm_jax.convert.inception_weights); "" = no rFID/FID
    config.eval.reference_stats    .npz (mu, sigma) of the evaluated split, from
                                   ldm_jax.eval.reference_stats; "" = use the inputs' own
    config.eval.num_examples       images `python -m ldm_jax.evaluate` scores (LDMs: samples,
                                   one per example); 0 = the whole split (training
                                   uses train.eval_examples)
    config.eval.clip_model         transformers CLIPModel folder (eval.clip_score) for the
                                   CLIP score of text-conditioned samples; "" = no CLIP score

Runs saved before the block existed lack it; their configs get these defaults.
"""

from __future__ import annotations

import ml_collections

from ldm_jax.eval import fid as fid_lib
from ldm_jax.models.inception import make_inception

DEFAULTS = {"inception_weights": "", "reference_stats": "", "num_examples": 0,
            "clip_model": ""}


def eval_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.eval with every key present; unknown keys are an error."""
  block = dict(config.get("eval", None) or {})
  unknown = sorted(set(block) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"unknown config keys eval.{unknown}; valid: {sorted(DEFAULTS)}")
  out = ml_collections.ConfigDict({**DEFAULTS, **block})
  if int(out.num_examples) < 0:
    raise ValueError(f"eval.num_examples={out.num_examples} must be >= 0 (0 = all)")
  if out.reference_stats and not out.inception_weights:
    raise ValueError("eval.reference_stats is set but eval.inception_weights is not: FID "
                     "needs the Inception network to embed the images it compares")
  return out


def eval_networks(config: ml_collections.ConfigDict, required: bool = False):
  """(Inception or None, (mu, sigma) or None); a configured but missing file is an error,
  and so is no file at all when `required` (FID of samples has nothing else to report)."""
  cfg = eval_config(config)
  if not cfg.inception_weights and not required:
    return None, None
  inception = make_inception(cfg.inception_weights)
  reference = fid_lib.load_stats(cfg.reference_stats) if cfg.reference_stats else None
  return inception, reference


def eval_clip_scorer(config: ml_collections.ConfigDict, mesh=None):
  """The CLIP scorer of `eval.clip_model` (replicated over `mesh`), or None when unset; a
  configured folder that is missing or not a CLIP model is an error."""
  cfg = eval_config(config)
  if not cfg.clip_model:
    return None
  from ldm_jax.eval.clip_score import load_clip_scorer
  return load_clip_scorer(cfg.clip_model, mesh)
