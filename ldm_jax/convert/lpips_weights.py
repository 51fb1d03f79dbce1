r"""Makes the LPIPS weights file ldm_jax reads, from the two public PyTorch checkpoints.

    python -m ldm_jax.convert.lpips_weights --vgg16=vgg16-397923af.pth --lin=vgg.pth \
        --out=lpips_vgg.safetensors

Inputs (download them on a machine with network access; this one has none):
  --vgg16  torchvision's ImageNet VGG16 state dict, `vgg16-397923af.pth`, from
           https://download.pytorch.org/models/vgg16-397923af.pth (what
           `torchvision.models.vgg16(weights="IMAGENET1K_V1")` fetches into ~/.cache/torch).
  --lin    the LPIPS v0.1 linear heads for VGG, `vgg.pth`, from the richzhang/
           PerceptualSimilarity repository (`lpips/weights/v0.1/vgg.pth`, also shipped in
           the `lpips` pip package).

The output holds the 26 conv tensors `features.{i}.weight/bias` and the 5 heads
`lin{k}.model.1.weight`, float32, PyTorch layout; `ldm_jax.models.lpips.load_lpips` reads it.
Checkpoints are read with `torch.load(weights_only=True)`: no arbitrary unpickling.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Mapping

import numpy as np

from ldm_jax import fs, outputs
from ldm_jax.convert.files import write_safetensors
from ldm_jax.models.lpips import torch_shapes


def _load_pth(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("Converting LPIPS weights reads PyTorch .pth files and needs torch "
                      "(CPU is enough): pip install torch") from e
  if not fs.exists(path):
    raise FileNotFoundError(f"{path} does not exist (see `python -m "
                            "ldm_jax.convert.lpips_weights --help` for where to get it)")
  with fs.local_file(path) as local:  # gs:// too
    state = torch.load(local, map_location="cpu", weights_only=True)
  if isinstance(state, Mapping) and "state_dict" in state:
    state = state["state_dict"]
  if not isinstance(state, Mapping):
    raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
  return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()
          if isinstance(v, torch.Tensor)}


def select(vgg16: Mapping[str, np.ndarray], lin: Mapping[str, np.ndarray],
           sources: tuple[str, str] = ("vgg16", "lin")) -> dict[str, np.ndarray]:
  """The LPIPS tensors out of the two state dicts; one error lists everything wrong."""
  out, problems = {}, []
  for key, shape in torch_shapes().items():
    source, name = (vgg16, sources[0]) if key.startswith("features.") else (lin, sources[1])
    if key not in source:
      problems.append(f"{key}: missing from {name}")
    elif tuple(source[key].shape) != shape:
      problems.append(f"{key}: {name} has shape {tuple(source[key].shape)}, expected {shape}")
    else:
      out[key] = np.asarray(source[key], np.float32)
  if problems:
    raise ValueError(
        f"cannot build LPIPS weights, {len(problems)} problem(s):\n  " + "\n  ".join(problems)
        + "\nExpected --vgg16 = torchvision vgg16-397923af.pth and --lin = LPIPS v0.1 vgg.pth.")
  return out


def convert(vgg16_path: str, lin_path: str, out_path: str, *,
            overwrite: bool = False) -> dict[str, np.ndarray]:
  """Reads both checkpoints, checks them, writes `out_path` atomically; returns the tensors.
  A file at `out_path` that ldm_jax did not write as weights is refused unless `overwrite`."""
  outputs.check_target(out_path, outputs.WEIGHTS, overwrite=overwrite)
  tensors = select(_load_pth(vgg16_path), _load_pth(lin_path), (vgg16_path, lin_path))
  write_safetensors(tensors, out_path, overwrite=overwrite)
  return tensors


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m ldm_jax.convert.lpips_weights", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--vgg16", required=True, help="torchvision vgg16-397923af.pth")
  parser.add_argument("--lin", required=True, help="LPIPS v0.1 vgg.pth")
  parser.add_argument("--out", required=True, help="output .safetensors path")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace --out even if ldm_jax did not write it")
  args = parser.parse_args(argv)
  try:
    tensors = convert(args.vgg16, args.lin, args.out, overwrite=args.overwrite)
  except (OSError, ValueError, ImportError) as e:  # a user's input problem: no traceback
    parser.exit(1, f"error: {e}\n")
  print(f"wrote {len(tensors)} tensors to {args.out}; set config.loss.lpips_weights={args.out}",
        file=sys.stderr)


if __name__ == "__main__":
  main()
