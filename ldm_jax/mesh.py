"""Device mesh and sharding rules: sharding stated as data, then checked.

The mesh has two axes, `data` and `fsdp` (`AXES`). Batches are split over both; parameters,
optimizer moments and EMA are split over `fsdp` and replicated over `data`, so fsdp > 1
trades all-gathers of the weights for memory. With `train.mesh.dcn_data = S > 1` the data
axis spans S slices (TPU multi-slice, or GPU hosts): fsdp's all-gathers stay inside a slice
on the fast interconnect (ICI / NVLink) and only the gradient all-reduce crosses the
data-centre network (DCN).

How an array is split is stated in two steps, the style of MaxDiffusion's
`resnet_flax` / `base14.yml` and flax's gemma `ShardingConfig`:

1. **Logical axis names** (`logical_axes`), from a parameter's path and shape:

   | leaf | logical axes |
   |---|---|
   | conv kernel (H, W, in, out) | ("keep", "keep", "conv_in", "conv_out") |
   | 1-D conv kernel (K, in, out) (the legacy UNet attention's qkv) | ("keep", "conv_in", "conv_out") |
   | linear kernel (in, out) | ("embed", "mlp") |
   | embedding table (vocab, dim): token, class, codebook | ("vocab", "embed") |
   | position embedding (length, dim) | ("length", "embed") |
   | norm scale / bias / statistics | ("norm",) |
   | other bias | ("bias",) |
   | other 1-D (the logvar table, RNG key data), scalars | ("vector",), () |

   Optimizer moments and the EMA have their parameter's path, so they get its names.
   Activations are named where the models constrain them (`layers.NHWC`, `layers.BLC`:
   ("batch", "height", "width", "channels") and ("batch", "length", "channels")).

2. **Rules** (`train.sharding_rules`, then `DEFAULT_RULES`): (logical name, mesh axes)
   pairs, where the mesh axes are an axis name, a tuple of them, or None (stay whole).
   A dimension takes the first rule for its name whose mesh axes exist, are not used by
   another dimension of the same array, and divide it; a None rule, or no fitting rule,
   leaves it whole. Dimensions are served largest first (ties in rule order), so with
   the defaults each weight's biggest divisible axis goes over `fsdp`. Arrays under
   `MIN_SHARDED_SIZE` elements stay replicated.

Activations are constrained at the models' block boundaries (`layers.constrain`) with the
same rules, inside `activation_sharding(mesh, rules)` (or a function wrapped by
`with_activation_sharding`): without the constraints XLA may pick a layout for a level's
output that is not batch-split and fall back to rematerializing whole tensors or to
all-to-all layout changes. Outside that context the constraints are no-ops, so models
compute exactly the same numbers with and without a mesh.

At start a run logs `describe_state` (per-device bytes of parameters, optimizer state,
EMA) and calls `check_sharded`, which fails a run with fsdp > 1 that leaves more than
`train.max_unsharded_fraction` of the state's bytes replicated (maxtext's
`sharding_tolerance`).
"""

from __future__ import annotations

import contextlib
import logging
import dataclasses
import functools
import math
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ldm_jax.models import layers

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
MESH_KEYS = ("data", "fsdp", "dcn_data")
# Arrays smaller than this stay replicated: sharding them costs more in collectives and
# per-array overhead than it saves (a 128-wide bias is 512 bytes).
MIN_SHARDED_SIZE = 2**14
DEFAULT_MAX_UNSHARDED_FRACTION = 0.1

# (logical name, mesh axes). Order matters twice: a name's rules are tried in order, and
# when two dimensions of an array have the same size the one whose name comes first here
# is served first (conv_out before conv_in, mlp before embed: column splits).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # activations: batch over every device; if the batch does not divide data x fsdp
    # (a small sampling batch), over data alone; else unconstrained.
    ("batch", ("data", "fsdp")),
    ("batch", "data"),
    ("height", None), ("width", None), ("length", None), ("channels", None),
    # parameters: the biggest divisible axis over fsdp, never over data.
    ("conv_out", "fsdp"), ("conv_in", "fsdp"),
    ("mlp", "fsdp"), ("embed", "fsdp"),
    ("vocab", "fsdp"),
    ("keep", None), ("norm", None), ("bias", None), ("vector", None),
)

Rules = tuple[tuple[str, tuple[str, ...] | None], ...]


# ---------------------------------------------------------------------------------------
# The mesh


# A mesh size given as "host": the devices of one host (jax.local_device_count()), so that
# fsdp's all-gathers stay on the host's fast links (NVLink, a TPU VM's ICI).
HOST = "host"


def _size(mesh_config: Mapping[str, Any], axis: str, local_devices: int) -> int:
  value = mesh_config.get(axis, 1)
  if isinstance(value, str) and value.strip() == HOST:
    return local_devices
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"train.mesh.{axis}={value!r}: give a size, -1 (the remaining devices) "
                     f"or {HOST!r} (the devices of one host)") from None


def mesh_shape(mesh_config: Mapping[str, Any], num_devices: int,
               local_devices: int | None = None) -> tuple[int, int]:
  """(data, fsdp) sizes; one of them may be -1 to take the remaining devices, and either
  may be "host" (the `local_devices` of one host; jax.local_device_count() by default)."""
  unknown_keys = sorted(set(mesh_config.keys()) - set(MESH_KEYS))
  if unknown_keys:
    raise ValueError(f"train.mesh has unknown keys {unknown_keys}; valid: {list(MESH_KEYS)}")
  local = jax.local_device_count() if local_devices is None else local_devices
  sizes = [_size(mesh_config, a, local) for a in AXES]
  unknown = [i for i, s in enumerate(sizes) if s == -1]
  if len(unknown) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"train.mesh {dict(zip(AXES, sizes))}: sizes must be positive, and at "
                     "most one may be -1 (all remaining devices)")
  if unknown:
    known = math.prod(s for s in sizes if s != -1)
    if num_devices % known:
      raise ValueError(f"train.mesh {dict(zip(AXES, sizes))}: {num_devices} devices are not "
                       f"divisible by {known}; set --config.train.mesh.fsdp to a divisor "
                       f"of {num_devices} (1 keeps the state replicated)")
    sizes[unknown[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"train.mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices "
                     f"but {num_devices} are visible; set --config.train.mesh.data=-1 to use "
                     "them all")
  return tuple(sizes)


def _auto_axis_types(n: int):
  """Auto (GSPMD-propagated) axes; newer jax.make_mesh defaults to Explicit, under which
  with_sharding_constraint and in/out shardings mean something else (DESIGN pitfalls)."""
  axis_type = getattr(jax.sharding, "AxisType", None)
  return (axis_type.Auto,) * n if axis_type is not None else None


def make_mesh(mesh_config: Mapping[str, int], devices=None) -> Mesh:
  """The (data, fsdp) mesh of `train.mesh`, laid out along the device topology.

  `jax.make_mesh` orders the devices so that neighbouring mesh positions are neighbours on
  the interconnect (TPU torus, NVLink islands); fsdp, the last and fastest-varying axis,
  gets the closest devices. `dcn_data` > 1 builds a hybrid mesh
  (`mesh_utils.create_hybrid_device_mesh`): the data axis is `dcn_data` slices (TPU
  slices, or processes on GPU) times data / dcn_data devices inside each.
  """
  devices = list(devices if devices is not None else jax.devices())
  local = sum(d.process_index == devices[0].process_index for d in devices)
  data, fsdp = mesh_shape(mesh_config, len(devices), local)
  dcn = int(mesh_config.get("dcn_data", 1))
  axis_types = _auto_axis_types(len(AXES))
  kwargs = {} if axis_types is None else {"axis_types": axis_types}
  if dcn < 1 or data % dcn:
    raise ValueError(f"train.mesh.dcn_data={dcn} must be >= 1 and divide the data axis "
                     f"({data}): the data axis is dcn_data slices of data / dcn_data devices")
  if dcn == 1:
    try:
      return jax.make_mesh((data, fsdp), AXES, devices=devices, **kwargs)
    except (ValueError, NotImplementedError, AssertionError) as e:
      # A device subset make_mesh cannot lay out on the topology: plain order.
      logging.warning("jax.make_mesh cannot lay out %d devices as %s (%s); using them in "
                      "the order given", len(devices), (data, fsdp), e)
      return Mesh(np.asarray(devices).reshape(data, fsdp), AXES, **kwargs)
  from jax.experimental import mesh_utils
  granule = {} if hasattr(devices[0], "slice_index") else {"process_is_granule": True}
  try:
    device_array = mesh_utils.create_hybrid_device_mesh(
        (data // dcn, fsdp), (dcn, 1), devices, **granule)
  except ValueError as e:
    raise ValueError(f"train.mesh.dcn_data={dcn}: cannot split the {len(devices)} devices "
                     f"into {dcn} slices of {data // dcn} x {fsdp} ({e}); dcn_data must be "
                     "the number of TPU slices (or GPU processes) the data axis spans") from e
  return Mesh(device_array, AXES, **kwargs)


def check_batch(global_batch: int, mesh: Mesh) -> None:
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch % shards:
    raise ValueError(f"data.batch_size={global_batch} is not divisible by the {shards} batch "
                     f"shards of the mesh {dict(mesh.shape)}, each of which takes an equal "
                     f"part of every batch: use a multiple of {shards}")
  if global_batch % jax.process_count():
    raise ValueError(f"data.batch_size={global_batch} is not divisible by the "
                     f"{jax.process_count()} processes, each of which reads an equal part "
                     f"of every batch: use a multiple of {jax.process_count()}")


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a run lays its arrays on devices, read once from `train`: the mesh, the rules from
  logical axis names to mesh axes, and how much of the state may stay unsharded."""

  mesh: Mesh
  rules: Rules = dataclasses.field(default_factory=lambda: normalize_rules(None))
  max_unsharded_fraction: float = DEFAULT_MAX_UNSHARDED_FRACTION

  @classmethod
  def from_config(cls, train_config: Mapping[str, Any], devices=None) -> "Layout":
    fraction = max_unsharded_fraction(train_config)
    if not 0.0 <= fraction <= 1.0:
      raise ValueError(f"train.max_unsharded_fraction={fraction} must be in [0, 1]")
    return cls(make_mesh(train_config["mesh"], devices), rules_from_config(train_config),
               fraction)

  def state_shardings(self, state: Any) -> Any:
    return state_shardings(self.mesh, state, self.rules)

  def batch_sharding(self, leading_dims: int = 0) -> NamedSharding:
    return batch_sharding(self.mesh, leading_dims, self.rules)

  def constrained(self, fn: Callable) -> Callable:
    """`fn` with the models' activation constraints on (wrap a step before jax.jit)."""
    return with_activation_sharding(fn, self.mesh, self.rules)

  def check(self, state: Any, shardings: Any) -> str:
    """The start-of-run memory line, after failing when fsdp leaves too much unsharded."""
    check_sharded(state, shardings, self.mesh, self.max_unsharded_fraction)
    return describe_state(state, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict:
  """Assembles each host's share into global arrays (multi-host safe)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


# ---------------------------------------------------------------------------------------
# Rules


def normalize_rules(rules: Iterable | None) -> Rules:
  """Rules as a tuple of (name, tuple-of-axes | None), from a config (JSON lists) or code."""
  if rules is None:
    rules = DEFAULT_RULES
  out = []
  for i, rule in enumerate(rules):
    if isinstance(rule, (str, bytes)) or len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f"train.sharding_rules[{i}]={rule!r}: each rule is a pair "
                       "(logical name, mesh axis | tuple of mesh axes | None)")
    name, axes = rule
    if axes is not None:
      axes = (axes,) if isinstance(axes, str) else tuple(axes)
      bad = [a for a in axes if a not in AXES]
      if bad or not axes:
        raise ValueError(f"train.sharding_rules[{i}]={rule!r}: mesh axes must be among "
                         f"{AXES} (or None to keep the dimension whole)")
    out.append((name, axes))
  return tuple(out)


def rules_from_config(train_config: Mapping[str, Any] | None) -> Rules:
  """`train.sharding_rules` of a config, followed by `DEFAULT_RULES`: a name's first rule
  wins, so the config's rules override the defaults for the names they mention."""
  rules = (train_config or {}).get("sharding_rules", None) or ()
  return normalize_rules(tuple(rules) + DEFAULT_RULES)


def max_unsharded_fraction(train_config: Mapping[str, Any] | None) -> float:
  return float((train_config or {}).get("max_unsharded_fraction",
                                        DEFAULT_MAX_UNSHARDED_FRACTION))


def resolve(names: Sequence[str | None], shape: Sequence[int],
            mesh_sizes: Mapping[str, int], rules: Rules) -> P:
  """The PartitionSpec the rules give an array of `shape` with logical `names`."""
  order = {}
  for i, (name, _) in enumerate(rules):
    order.setdefault(name, i)
  dims = sorted(range(len(shape)),
                key=lambda d: (-shape[d], order.get(names[d], len(rules)), -d))
  spec: list[Any] = [None] * len(shape)
  used: set[str] = set()
  for d in dims:
    for name, axes in rules:
      if name != names[d]:
        continue
      if axes is None:
        break
      if (any(a not in mesh_sizes or a in used for a in axes)
          or shape[d] % math.prod(mesh_sizes[a] for a in axes)):
        continue
      spec[d] = axes[0] if len(axes) == 1 else axes
      used.update(axes)
      break
  return P(*spec)


def _key_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _path_names(path) -> list[str]:
  names = [_key_name(k) for k in path]
  return names[:-1] if names and names[-1] == "value" else names  # nnx Variable leaves


_NORM_LEAVES = {"scale", "mean", "var"}


def logical_axes(path, shape: Sequence[int]) -> tuple[str, ...]:
  """Logical axis names of a state leaf from its key path and shape (see the table)."""
  names = _path_names(path)
  leaf = names[-1] if names else ""
  ndim = len(shape)
  if ndim == 0:
    return ()
  if ndim == 1:
    if leaf in _NORM_LEAVES or re.search(r"norm", names[-2] if len(names) > 1 else ""):
      return ("norm",)
    return ("bias",) if leaf == "bias" else ("vector",)
  if ndim == 2:
    if leaf == "position_embedding":
      return ("length", "embed")
    if leaf == "embedding":  # nnx.Embed's table: tokens, classes, a VQ codebook
      return ("vocab", "embed")
    return ("embed", "mlp")
  if ndim == 3:
    return ("keep", "conv_in", "conv_out")
  if ndim == 4:
    return ("keep", "keep", "conv_in", "conv_out")
  return ("keep",) * ndim


def leaf_spec(mesh: Mesh, path, shape: Sequence[int], rules: Rules) -> P:
  if math.prod(shape) < MIN_SHARDED_SIZE:
    return P()
  return resolve(logical_axes(path, shape), shape, dict(mesh.shape), rules)


def state_shardings(mesh: Mesh, abstract_state: Any, rules: Iterable | None = None) -> Any:
  """A NamedSharding for every leaf of a (possibly abstract) train state, by the rules."""
  rules = normalize_rules(rules)
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: NamedSharding(
          mesh, leaf_spec(mesh, path, tuple(getattr(leaf, "shape", ())), rules)),
      abstract_state)


def batch_sharding(mesh: Mesh, leading_dims: int = 0,
                   rules: Iterable | None = None) -> NamedSharding:
  """Batch dimension split over the first "batch" rule's axes (data x fsdp by default);
  `leading_dims` unsplit dims come first."""
  axes = next((a for name, a in normalize_rules(rules) if name == "batch" and a is not None
               and all(x in mesh.shape for x in a)), BATCH_AXES)
  return NamedSharding(mesh, P(*([None] * leading_dims), axes))


# ---------------------------------------------------------------------------------------
# Activations


def _activation_sharding(mesh: Mesh, rules: Rules, names, shape) -> NamedSharding | None:
  spec = resolve(tuple(names), tuple(shape), dict(mesh.shape), rules)
  batch = [d for d, n in enumerate(names) if n == "batch"]
  # Only a batch-split layout is imposed: constraining to "replicated" because a small
  # batch does not divide the mesh would force the all-gather the constraint is there to
  # prevent; XLA then picks the layout.
  if not batch or spec[batch[0]] is None:
    return None
  return NamedSharding(mesh, spec)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Iterable | None = None):
  """Inside it (at trace time), `layers.constrain` constrains activations over `mesh`."""
  token = layers.ACTIVATION_SHARDING.set(
      functools.partial(_activation_sharding, mesh, normalize_rules(rules)))
  try:
    yield
  finally:
    layers.ACTIVATION_SHARDING.reset(token)


def with_activation_sharding(fn: Callable, mesh: Mesh,
                             rules: Iterable | None = None) -> Callable:
  """`fn` whose body runs inside `activation_sharding`: wrap a step before `jax.jit`, so
  the constraints hold whoever calls (or lowers) the compiled step."""
  rules = normalize_rules(rules)

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with activation_sharding(mesh, rules):
      return fn(*args, **kwargs)

  return wrapped


# ---------------------------------------------------------------------------------------
# What the state costs per device, and the check


def _leaf_bytes(leaf, sharding) -> tuple[int, int]:
  """(global bytes, bytes on one device) of an array under `sharding`."""
  shape = tuple(getattr(leaf, "shape", ()))
  itemsize = np.dtype(getattr(leaf, "dtype", np.float32)).itemsize
  total = math.prod(shape) * itemsize
  if sharding is None or not hasattr(sharding, "shard_shape"):
    return total, total
  return total, math.prod(sharding.shard_shape(shape)) * itemsize


def state_bytes(state: Any, shardings: Any) -> list[dict]:
  """One row per leaf: path, group (the state's top-level field), shape, logical axes,
  spec, global and per-device bytes."""
  rows = []
  flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(
      x, jax.sharding.Sharding))
  flat = jax.tree_util.tree_leaves_with_path(state)
  if len(flat) != len(flat_shardings):
    raise ValueError(f"state has {len(flat)} arrays but shardings {len(flat_shardings)}")
  for (path, leaf), sharding in zip(flat, flat_shardings):
    names = _path_names(path)
    total, per_device = _leaf_bytes(leaf, sharding)
    rows.append({"path": jax.tree_util.keystr(path).removesuffix(".value"), "group": names[0] if names else "",
                 "shape": tuple(getattr(leaf, "shape", ())),
                 "logical": logical_axes(path, tuple(getattr(leaf, "shape", ()))),
                 "spec": getattr(sharding, "spec", None), "bytes": total,
                 "device_bytes": per_device})
  return rows


def _fmt(n: float) -> str:
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= size:
      return f"{n / size:.2f} {unit}"
  return f"{int(n)} B"


def _unsharded(rows: list[dict], mesh_size: int) -> list[dict]:
  return [r for r in rows if r["bytes"] and r["device_bytes"] == r["bytes"]] if (
      mesh_size > 1) else list(rows)


def describe_state(state: Any, shardings: Any) -> str:
  """Per-device bytes of the train state by field (params, opt_state, ema, ...), for the
  start-of-run log."""
  rows = state_bytes(state, shardings)
  mesh = next((s.mesh for s in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(
      x, jax.sharding.Sharding)) if hasattr(s, "mesh")), None)
  groups: dict[str, list[int]] = {}
  for r in rows:
    g = groups.setdefault(r["group"], [0, 0])
    g[0] += r["bytes"]
    g[1] += r["device_bytes"]
  total = sum(g[0] for g in groups.values())
  device = sum(g[1] for g in groups.values())
  size = mesh.size if mesh is not None else 1
  replicated_bytes = sum(r["bytes"] for r in _unsharded(rows, size)) if size > 1 else total
  big = [(k, v) for k, v in groups.items() if v[0] >= 2**20]
  small = sum(v[1] for k, v in groups.items() if v[0] < 2**20)
  parts = [f"{k} {_fmt(v[1])} (of {_fmt(v[0])})" for k, v in big]
  if small:
    parts.append(f"other {_fmt(small)}")
  where = (f"mesh {dict(mesh.shape)}" if mesh is not None else "no mesh")
  return (f"train state per device on {where}: {_fmt(device)} of {_fmt(total)} in all; "
          + ", ".join(parts) +
          f"; {replicated_bytes / max(total, 1):.1%} of the bytes replicated on every device")


def check_sharded(state: Any, shardings: Any, mesh: Mesh,
                  max_fraction: float = DEFAULT_MAX_UNSHARDED_FRACTION) -> None:
  """Fails when fsdp > 1 leaves more than `max_fraction` of the state's bytes unsharded."""
  fsdp = mesh.shape.get("fsdp", 1)
  if fsdp <= 1:
    return
  rows = state_bytes(state, shardings)
  total = sum(r["bytes"] for r in rows)
  unsharded = sorted(_unsharded(rows, mesh.size), key=lambda r: -r["bytes"])
  fraction = sum(r["bytes"] for r in unsharded) / max(total, 1)
  if fraction <= max_fraction:
    return
  worst = "; ".join(f"{r['path']} {r['shape']} {_fmt(r['bytes'])} logical {r['logical']}"
                    for r in unsharded[:5])
  raise ValueError(
      f"train.mesh.fsdp={fsdp} but {fraction:.1%} of the train state's {_fmt(total)} stays "
      f"unsharded on every device (train.max_unsharded_fraction={max_fraction}). Largest "
      f"unsharded arrays: {worst}. Map their logical axes to 'fsdp' in "
      "train.sharding_rules (a dimension must divide the fsdp size), pick an fsdp size "
      "that divides them, or raise train.max_unsharded_fraction")
