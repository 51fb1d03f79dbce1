"""Reading and writing PyTorch weight files safely.

safetensors is the exchange format. A pickled `.ckpt`/`.pt`/`.pth`/`.bin` is read only with
`torch.load(weights_only=True)`, never unpickled blindly. Writes go through
`ldm_jax.outputs`: atomic (a file or folder appears complete under its final name, or not
at all), marked as ldm_jax's, and never over something ldm_jax did not write. Paths may
be local or gs:// (ldm_jax.fs): a remote file is downloaded to a temporary local copy
for reading (safetensors memory-maps it, torch.load wants a file).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ldm_jax import fs, outputs

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


class WeightFileError(ValueError):
  """The weight file is missing, unreadable or of an unknown kind."""


def read_json_object(path, error: type[ValueError] = WeightFileError) -> dict:
  """A JSON file holding one object (a config.json, model_index.json, ...), as a dict;
  `error` (a ValueError) names the file when it is not valid JSON or not an object."""
  # A path object (pathlib, or etils.epath for gs://) reads itself; a string goes through fs.
  text = path.read_text() if hasattr(path, "read_text") else fs.read_text(path)
  try:
    value = json.loads(text)
  except ValueError as err:
    raise error(f"{path} is not valid JSON: {err}") from err
  if not isinstance(value, dict):
    raise error(f"{path} holds a {type(value).__name__}, not an object")
  return value


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a safetensors or torch checkpoint file as NumPy (float types as float32).

  A Lightning checkpoint's `state_dict` nesting is removed.
  """
  path = fs.path(path)
  if not fs.isfile(path):
    raise WeightFileError(f"no weight file at {path}")
  if path.suffix == ".safetensors":
    with fs.local_file(path) as local:
      tensors = _read_safetensors(Path(local), path)
  elif path.suffix in PICKLE_SUFFIXES:
    with fs.local_file(path) as local:
      tensors = _read_torch(Path(local), path)
  else:
    raise WeightFileError(f"{path}: unknown weight file type {path.suffix!r}; expected "
                          f".safetensors or one of {', '.join(PICKLE_SUFFIXES)}")
  if not tensors:
    raise WeightFileError(f"{path} holds no tensors")
  return tensors


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
  if fs.is_remote(path):
    return _remote_safetensors_metadata(os.fspath(path))
  from safetensors import safe_open
  with safe_open(str(path), framework="numpy") as f:
    return dict(f.metadata() or {})


def _remote_safetensors_metadata(path: str) -> dict[str, str]:
  """The header's __metadata__, read without fetching the tensors: 8 bytes of header
  length (little endian), then the JSON header."""
  with fs.open(path, "rb") as f:
    size = int.from_bytes(f.read(8), "little")
    if not 0 < size < 100_000_000:
      raise WeightFileError(f"{path} is not a safetensors file (header size {size})")
    header = json.loads(f.read(size))
  metadata = header.get("__metadata__") if isinstance(header, dict) else None
  return dict(metadata or {})


def _read_safetensors(path: Path, shown=None) -> dict[str, np.ndarray]:
  """`shown`: the name in errors (the gs:// URL of a downloaded copy)."""
  from safetensors import SafetensorError, safe_open
  try:
    with safe_open(str(path), framework="flax") as f:  # flax: bfloat16 reads too
      return {k: _as_numpy(np.asarray(f.get_tensor(k))) for k in f.keys()}
  except (SafetensorError, OSError, ValueError) as err:
    raise WeightFileError(f"{shown or path} is not a readable safetensors file (truncated, "
                          f"corrupt, or another format renamed?): {err}") from err


def _read_torch(path: Path, shown=None) -> dict[str, np.ndarray]:
  shown = shown or path
  try:
    import torch
  except ImportError as err:
    raise WeightFileError(
        f"reading {shown.name} needs PyTorch (pip install torch==2.13.0); or convert it to "
        "safetensors elsewhere") from err
  try:
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as err:  # torch raises many types for bad pickles
    raise WeightFileError(
        f"{shown} could not be read with torch.load(weights_only=True) (truncated or not a "
        f"PyTorch checkpoint, or it holds arbitrary Python objects): {err}") from err
  if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise WeightFileError(f"{shown} holds a {type(obj).__name__}, not a state dict")
  out = {}
  for key, value in obj.items():
    if isinstance(value, torch.Tensor):
      value = value.detach().cpu()
      if value.is_floating_point():
        value = value.float()
      out[key] = value.numpy()
  return out


def _as_numpy(a: np.ndarray) -> np.ndarray:
  if a.dtype.kind == "f" or a.dtype.name == "bfloat16":
    return a.astype(np.float32)
  return a


def strip_nesting(tensors: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  """Keeps the tensors under `prefix` (e.g. 'first_stage_model.') if any, without it."""
  nested = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
  return nested or tensors


def write_safetensors(tensors: dict[str, np.ndarray], path: str | os.PathLike,
                      metadata: dict[str, str] | None = None, *, kind: str = outputs.WEIGHTS,
                      overwrite: bool = False) -> None:
  """One .safetensors file marked as a `kind` output (see ldm_jax.outputs)."""
  from safetensors.numpy import save_file
  with outputs.atomic_path(path, kind, overwrite=overwrite) as tmp:
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp),
              metadata={"format": "pt", **(metadata or {}), **outputs.safetensors_metadata(kind)})


def write_diffusers_folder(tensors: dict[str, np.ndarray], config: dict,
                           path: str | os.PathLike, *, kind: str,
                           overwrite: bool = False) -> None:
  """A folder for diffusers' `from_pretrained`: config.json and the weights."""
  from safetensors.numpy import save_file
  with outputs.atomic_path(path, kind, overwrite=overwrite) as tmp:
    tmp.mkdir()
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
              str(tmp / DIFFUSERS_WEIGHTS), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
