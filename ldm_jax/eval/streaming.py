"""Host-side accumulation of per-image values from sharded, padded batches, and the FID
network's forward pass that every evaluator shares.

Evaluation batches are global arrays split over the mesh, padded at the end with masked-out
blank images (`data.pipeline.eval_batches`). Values come to every host with one all-gather
and are summed in float64, so the result does not depend on the batch size, the number of
devices or hosts, nor on the padding.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from ldm_jax import mesh as mesh_lib


def to_host(x) -> np.ndarray:
  """The whole of a (possibly multi-host sharded) global array, on every host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def image_batch(batch: dict, sharding) -> tuple[jax.Array, np.ndarray]:
  """A host's {"image", "mask"} share as one global image array, and the whole mask."""
  image, mask = (jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
                 for k in ("image", "mask"))
  return image, to_host(mask).astype(bool)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _inception_outputs(graphdef, state, images, names):
  out = nnx.merge(graphdef, state)(images)
  return {k: out[k] for k in names}


class InceptionForward:
  """The FID network replicated over a mesh: global NHWC images in [-1, 1] -> the named
  outputs ("pool", "logits_unbiased", ...) of the whole batch, on the host. One compiled
  program per architecture and batch shape, shared by every instance in the process."""

  def __init__(self, inception, mesh, outputs: tuple[str, ...] = ("pool",)):
    self.graphdef = nnx.graphdef(inception)
    self.state = jax.device_put(nnx.state(inception), mesh_lib.replicated(mesh))
    self.outputs = tuple(outputs)

  def __call__(self, images: jax.Array) -> dict[str, np.ndarray]:
    out = _inception_outputs(self.graphdef, self.state, images, self.outputs)
    return {k: to_host(v) for k, v in out.items()}


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
