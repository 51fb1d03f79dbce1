"""Naming and layout rules between NNX modules and PyTorch state dicts.

ldm_jax modules carry the attribute names of the reference (CompVis) modules, so a
module's PyTorch key is its NNX path joined by dots with the leaf renamed per layer type
(``kernel`` -> ``weight`` and so on). This file owns that rule in both directions; the
layout-specific converters (CompVis, diffusers) only rename keys.

Tensors cross this boundary as NumPy arrays in the PyTorch layout (NCHW kernels as
``(O, I, H, W)``, linear weights as ``(O, I)``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ldm_jax.models.layers import Buffer


@dataclasses.dataclass(frozen=True)
class LeafRule:
  torch_name: str
  to_torch: Callable[[np.ndarray], np.ndarray] = lambda a: a
  from_torch: Callable[[np.ndarray], np.ndarray] = lambda a: a


def _kernel_to_torch(a: np.ndarray) -> np.ndarray:
  if a.ndim == 4:  # (H, W, I, O) -> (O, I, H, W)
    return np.transpose(a, (3, 2, 0, 1))
  if a.ndim == 2:  # (I, O) -> (O, I)
    return a.T
  if a.ndim == 3:  # conv1d (K, I, O) -> (O, I, K)
    return np.transpose(a, (2, 1, 0))
  raise ValueError(f"unexpected kernel rank {a.ndim}")


def _kernel_from_torch(a: np.ndarray) -> np.ndarray:
  if a.ndim == 4:
    return np.transpose(a, (2, 3, 1, 0))
  if a.ndim == 2:
    return a.T
  if a.ndim == 3:
    return np.transpose(a, (2, 1, 0))
  raise ValueError(f"unexpected weight rank {a.ndim}")


_KERNEL = LeafRule("weight", _kernel_to_torch, _kernel_from_torch)
_NORM = {"scale": LeafRule("weight"), "bias": LeafRule("bias"),
         "mean": LeafRule("running_mean"), "var": LeafRule("running_var")}

# Per module type: NNX leaf name -> how it appears in PyTorch. Modules not listed keep
# their leaf names and shapes; a module may extend this with `register_leaf_rules`.
_RULES: dict[type, dict[str, LeafRule]] = {
    nnx.Conv: {"kernel": _KERNEL, "bias": LeafRule("bias")},
    nnx.Linear: {"kernel": _KERNEL, "bias": LeafRule("bias")},
    nnx.Embed: {"embedding": LeafRule("weight")},
    nnx.GroupNorm: _NORM,
    nnx.LayerNorm: _NORM,
    nnx.BatchNorm: _NORM,
}


def register_leaf_rules(module_type: type, rules: dict[str, LeafRule]) -> None:
  _RULES[module_type] = rules


# State kinds that belong to a saved model. RNG state and optimizer counters do not.
SAVED_VARIABLES = nnx.Any(nnx.Param, nnx.BatchStat, Buffer)


@dataclasses.dataclass(frozen=True)
class TorchLeaf:
  path: tuple[Any, ...]  # NNX path of the variable
  rule: LeafRule
  shape: tuple[int, ...]  # PyTorch shape
  dtype: Any


def torch_leaves(model: nnx.Module) -> dict[str, TorchLeaf]:
  """Maps every saved variable of `model` to its PyTorch key (works on abstract models)."""
  owners = {path: type(node) for path, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Module)}
  leaves = {}
  for path, var in nnx.to_flat_state(nnx.state(model, SAVED_VARIABLES)):
    owner = owners.get(tuple(path[:-1]))
    rule = _rules_for(owner).get(path[-1], LeafRule(str(path[-1])))
    key = ".".join(str(p) for p in path[:-1]) + "." + rule.torch_name
    value = var.get_value() if hasattr(var, "get_value") else var.value
    # A zero-stride view: gives the PyTorch shape without allocating the tensor.
    shape = rule.to_torch(np.broadcast_to(np.zeros((), np.float32), value.shape)).shape
    leaves[key.lstrip(".")] = TorchLeaf(tuple(path), rule, tuple(shape), value.dtype)
  return leaves


def _rules_for(owner: type | None) -> dict[str, LeafRule]:
  if owner is None:
    return {}
  for klass in owner.__mro__:
    if klass in _RULES:
      return _RULES[klass]
  return {}


def export_state(model: nnx.Module) -> dict[str, np.ndarray]:
  """The model's saved variables as a PyTorch-layout dict of NumPy arrays."""
  leaves = torch_leaves(model)
  flat = dict(nnx.to_flat_state(nnx.state(model, SAVED_VARIABLES)))
  out = {}
  for key, leaf in leaves.items():
    var = flat[leaf.path]
    # np.array, not np.ascontiguousarray, which turns 0-d buffers into shape (1,).
    out[key] = np.array(leaf.rule.to_torch(np.asarray(jax.device_get(var[...]))), order="C")
  return out


class StateMismatchError(ValueError):
  """Raised when a state dict does not fit a model; lists every problem at once."""


def check_state(expected: dict[str, TorchLeaf], tensors: dict[str, np.ndarray],
                source: str, hint: str = "") -> None:
  """Raises one error naming every missing, unexpected and mis-shaped tensor."""
  missing = sorted(set(expected) - set(tensors))
  unexpected = sorted(set(tensors) - set(expected))
  misshaped = sorted(
      f"{k}: file has {tuple(tensors[k].shape)}, model expects {expected[k].shape}"
      for k in set(expected) & set(tensors)
      if tuple(tensors[k].shape) != expected[k].shape)
  if not (missing or unexpected or misshaped):
    return
  lines = [f"{source} does not match the model:"]
  for title, items in (("missing", missing), ("unexpected", unexpected),
                       ("wrong shape", misshaped)):
    if items:
      lines.append(f"  {len(items)} {title}: " + ", ".join(items[:20])
                   + (f", ... ({len(items) - 20} more)" if len(items) > 20 else ""))
  if hint:
    lines.append(hint)
  raise StateMismatchError("\n".join(lines))


def import_state(model: nnx.Module, tensors: dict[str, np.ndarray], source: str,
                 hint: str = "") -> None:
  """Loads a PyTorch-layout dict into `model` in place, all or nothing."""
  leaves = torch_leaves(model)
  check_state(leaves, tensors, source, hint)
  flat = dict(nnx.to_flat_state(nnx.state(model, SAVED_VARIABLES)))
  updates = []
  for key, leaf in leaves.items():
    var = flat[leaf.path]
    array = jnp.asarray(leaf.rule.from_torch(np.asarray(tensors[key])), dtype=leaf.dtype)
    updates.append((leaf.path, var.replace(array)))
  nnx.update(model, nnx.from_flat_state(updates))
