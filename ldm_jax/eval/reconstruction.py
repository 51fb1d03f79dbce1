"""Reconstruction metrics of a first-stage model over a data split, streamed and sharded.

The evaluator takes the model as a function, `reconstruct(state, x, key) -> (xrec, sample
or None)` (a KL model's posterior mode and a posterior sample, decoded). One jitted step
per global batch reconstructs and scores every image (PSNR, SSIM, and LPIPS / Inception
features when those networks are given); a reconstruct function that cannot be jitted
(tiled encode / decode walks tiles on the host) runs as it is, and only the scoring is
jitted. The host accumulates the values in float64 (`streaming`, `fid`). The trainer's validation and the
`ldm_jax.evaluate` CLI both run this, so the numbers during training and after are the
same computation.

rFID, as in the LDM paper, is the FID between the reconstructions and the images that
were reconstructed; with reference statistics (an `.npz` of the same split) the inputs'
Inception pass is skipped.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ldm_jax.eval import fid as fid_lib
from ldm_jax.eval import metrics as image_metrics
from ldm_jax.eval.streaming import InceptionForward, MeanStd, image_batch, to_host

PER_IMAGE = ("psnr", "ssim", "lpips")


@dataclasses.dataclass
class Result:
  metrics: dict[str, float]  # psnr, psnr_std, ..., rfid, num_examples
  # The first batch's real images (no padding): [b, H, 2W or 3W, 3] input | recon (| sample)
  grid: np.ndarray | None
  recon_stats: fid_lib.FeatureStats | None = None
  input_stats: fid_lib.FeatureStats | None = None


class ReconstructionEvaluator:
  """Built once per run (it compiles on first use); call `evaluate` with any state."""

  def __init__(self, reconstruct: Callable, batch_sharding: jax.sharding.NamedSharding, *,
               jit_reconstruct: bool = True, lpips_model=None, inception=None,
               reference: tuple[np.ndarray, np.ndarray] | None = None):
    """`batch_sharding`: how a global batch lies on the mesh (the networks are replicated
    on the same mesh)."""
    self.sharding = batch_sharding
    self.reference = reference
    replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    nets = {"lpips": lpips_model, "inception": inception}
    self.net_defs = {k: nnx.graphdef(m) for k, m in nets.items() if m is not None}
    self.net_states = {k: jax.device_put(nnx.state(m), replicated)
                       for k, m in nets.items() if m is not None}
    input_features = inception is not None and reference is None
    net_defs = self.net_defs

    def score(net_states, x, xrec):
      xrec = jnp.clip(xrec.astype(jnp.float32), -1.0, 1.0)
      values = {"psnr": image_metrics.psnr(x, xrec), "ssim": image_metrics.ssim(x, xrec)}
      if "lpips" in net_defs:
        values["lpips"] = nnx.merge(net_defs["lpips"], net_states["lpips"])(x, xrec)
      if "inception" in net_defs:
        net = nnx.merge(net_defs["inception"], net_states["inception"])
        if input_features:
          both = net(jnp.concatenate([x, xrec], axis=0))["pool"]
          values["features_input"], values["features_recon"] = jnp.split(both, 2)
        else:
          values["features_recon"] = net(xrec)["pool"]
      return xrec, values

    def step(state, net_states, x, key):
      xrec, sample = reconstruct(state, x, key)
      xrec, values = score(net_states, x, xrec)
      return xrec, sample, values

    if jit_reconstruct:
      self._step = jax.jit(step)
    else:
      jitted_score = jax.jit(score)

      def eager_step(state, net_states, x, key):
        xrec, sample = reconstruct(state, x, key)
        xrec, values = jitted_score(net_states, x, xrec)
        return xrec, sample, values

      self._step = eager_step

  def evaluate(self, state, batches: Iterable[dict], *, grid: bool = True,
               progress: Callable[[int], None] | None = None) -> Result:
    """Streams `batches` ({"image", "mask"} per host, as `eval_batches` yields)."""
    scores = {name: MeanStd() for name in PER_IMAGE}
    recon_stats = fid_lib.FeatureStats() if "inception" in self.net_defs else None
    input_stats = (fid_lib.FeatureStats()
                   if recon_stats is not None and self.reference is None else None)
    shown = None
    for i, batch in enumerate(batches):
      x, mask = image_batch(batch, self.sharding)
      xrec, sample, values = self._step(state, self.net_states, x, jax.random.key(i))
      values = {k: to_host(v) for k, v in values.items()}
      for name in PER_IMAGE:
        if name in values:
          scores[name].update(values[name], mask)
      if recon_stats is not None:
        recon_stats.update(values["features_recon"], mask)
      if input_stats is not None:
        input_stats.update(values["features_input"], mask)
      if grid and shown is None and mask.any():
        # Only real images: a small split's batch is padded with blanks (mask False),
        # which would show as grey rows.
        parts = [x, xrec] + ([sample] if sample is not None else [])
        shown = np.concatenate([to_host(p) for p in parts], axis=2)[mask]
      if progress is not None:
        progress(int(mask.sum()))
    if not scores["psnr"].count:
      raise ValueError("no images were evaluated: the split is empty or every record was "
                       "undecodable")
    metrics = {"num_examples": scores["psnr"].count}
    for name, s in scores.items():
      if s.count:
        metrics[name], metrics[f"{name}_std"] = s.mean(), s.std()
    if recon_stats is not None:
      if recon_stats.count < 2:
        raise ValueError("rFID needs at least 2 images")
      metrics["rfid"] = fid_lib.fid_from_stats(
          recon_stats, self.reference if self.reference is not None else input_stats)
    return Result(metrics, shown, recon_stats, input_stats)


def feature_stats(inception, sharding: jax.sharding.NamedSharding, batches: Iterable[dict],
                  progress: Callable[[int], None] | None = None) -> fid_lib.FeatureStats:
  """Inception pool-feature statistics of a split's images (for reference `.npz` files);
  `sharding` is the global batch's."""
  forward = InceptionForward(inception, sharding.mesh)
  stats = fid_lib.FeatureStats()
  for batch in batches:
    x, mask = image_batch(batch, sharding)
    stats.update(forward(x)["pool"], mask)
    if progress is not None:
      progress(int(mask.sum()))
  return stats


def summary_line(metrics: dict[str, Any]) -> str:
  return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                  for k, v in metrics.items())
