"""Host-side accumulation of per-image values from sharded, padded batches.

Evaluation batches are global arrays split over the mesh, padded at the end with masked-out
blank images (`data.pipeline.eval_batches`). Values come to every host with one all-gather
and are summed in float64, so the result does not depend on the batch size, the number of
devices or hosts, nor on the padding.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def to_host(x) -> np.ndarray:
  """The whole of a (possibly multi-host sharded) global array, on every host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


class MeanStd:
  """Mean and population std over images of one scalar per image."""

  def __init__(self):
    self.count = 0
    self.total = 0.0
    self.total_sq = 0.0

  def update(self, values, mask=None) -> None:
    v = np.asarray(values, np.float64).reshape(-1)
    if mask is not None:
      v = v[np.asarray(mask, bool).reshape(-1)]
    self.count += v.size
    self.total += float(v.sum())
    self.total_sq += float(np.sum(v * v))

  def mean(self) -> float:
    if not self.count:
      raise ValueError("no values were accumulated")
    return self.total / self.count

  def std(self) -> float:
    m = self.mean()
    return float(np.sqrt(max(self.total_sq / self.count - m * m, 0.0)))
