"""Device mesh and sharding rules.

The mesh has a `data` axis and an `fsdp` axis. Batches are split over both; parameters and
optimizer state are split over `fsdp` along their largest evenly divisible dimension
(replicated over `data`), so fsdp > 1 trades all-gathers for memory.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
# Arrays smaller than this stay replicated: sharding them costs more than it saves.
MIN_SHARDED_SIZE = 2**14


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, int]:
  """(data, fsdp) sizes; one of them may be -1 to take the remaining devices."""
  sizes = [int(mesh_config.get(a, 1)) for a in AXES]
  unknown = [i for i, s in enumerate(sizes) if s == -1]
  if len(unknown) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"train.mesh {dict(zip(AXES, sizes))}: sizes must be positive, and at "
                     "most one may be -1 (all remaining devices)")
  if unknown:
    known = math.prod(s for s in sizes if s != -1)
    if num_devices % known:
      raise ValueError(f"train.mesh {dict(zip(AXES, sizes))}: {num_devices} devices are not "
                       f"divisible by {known}")
    sizes[unknown[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"train.mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices "
                     f"but {num_devices} are visible; set --config.train.mesh.data=-1 to use "
                     "them all")
  return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices=None) -> Mesh:
  devices = devices if devices is not None else jax.devices()
  shape = mesh_shape(mesh_config, len(devices))
  device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, AXES)


def check_batch(global_batch: int, mesh: Mesh) -> None:
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch % shards:
    raise ValueError(f"data.batch_size={global_batch} is not divisible by the {shards} batch "
                     f"shards of the mesh {dict(mesh.shape)}; use a multiple of {shards}")
  if global_batch % jax.process_count():
    raise ValueError(f"data.batch_size={global_batch} is not divisible by the "
                     f"{jax.process_count()} processes")


def batch_sharding(mesh: Mesh, leading_dims: int = 0) -> NamedSharding:
  """Batch dimension split over every device; `leading_dims` unsplit dims come first."""
  return NamedSharding(mesh, P(*([None] * leading_dims), BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
  """Shards the largest dimension divisible by the fsdp size; small arrays replicate."""
  fsdp = mesh.shape["fsdp"]
  if fsdp == 1 or math.prod(shape) < MIN_SHARDED_SIZE:
    return replicated(mesh)
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return NamedSharding(mesh, P(*spec))
  return replicated(mesh)


def state_shardings(mesh: Mesh, abstract_state: Any) -> Any:
  """A sharding for every leaf of a (possibly abstract) train state."""
  return jax.tree.map(lambda leaf: fsdp_sharding(mesh, tuple(getattr(leaf, "shape", ()))),
                      abstract_state)


def global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict:
  """Assembles each host's share into global arrays (multi-host safe)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}
