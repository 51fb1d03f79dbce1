r"""Makes the FID Inception weights file ldm_jax reads, from the public PyTorch checkpoint.

    python -m ldm_jax.convert.inception_weights \
        --src=pt_inception-2015-12-05-6726825d.pth --out=inception_fid.safetensors

Input (download it on a machine with network access; this one has none): the TF
2015-12-05 InceptionV3 graph ported to PyTorch, either
  pt_inception-2015-12-05-6726825d.pth   from pytorch-fid's GitHub release (fid_weights), or
  weights-inception-2015-12-05-6726825d.pth   from torch-fidelity's GitHub release v0.2.0.
Both hold the same state dict: `Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.*`, ...,
`fc.weight` [1008, 2048], `fc.bias`. BatchNorm step counters and auxiliary-head tensors,
if present, are dropped; anything else that does not fit is an error listing every key.

The output is float32 safetensors in the same layout; `ldm_jax.models.inception` reads it.
The checkpoint is read with `torch.load(weights_only=True)`: no arbitrary unpickling.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from ldm_jax import outputs
from ldm_jax.convert.files import WeightFileError, read_tensors, write_safetensors
from ldm_jax.convert.torch_layout import StateMismatchError

IGNORED_SUFFIXES = (".num_batches_tracked",)
IGNORED_PREFIXES = ("AuxLogits.",)


def select(tensors: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
  """The FID Inception tensors of a state dict, checked against the network's shapes."""
  from ldm_jax.models.inception import inception_from_state  # pylint: disable=import-outside-toplevel
  kept = {k: np.asarray(v, np.float32) for k, v in tensors.items()
          if not k.endswith(IGNORED_SUFFIXES) and not k.startswith(IGNORED_PREFIXES)}
  inception_from_state(kept, source)  # raises StateMismatchError naming every problem
  return kept


def convert(src: str, out: str, *, overwrite: bool = False) -> dict[str, np.ndarray]:
  """Reads `src` (.pth or .safetensors), checks it, writes `out` atomically. A file at
  `out` that ldm_jax did not write as weights is refused unless `overwrite`."""
  outputs.check_target(out, outputs.WEIGHTS, overwrite=overwrite)
  tensors = select(read_tensors(src), src)
  write_safetensors(tensors, out, metadata={"source": "FID InceptionV3 (TF 2015-12-05)"},
                    overwrite=overwrite)
  return tensors


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m ldm_jax.convert.inception_weights", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--src", required=True,
                      help="pt_inception-2015-12-05-6726825d.pth (pytorch-fid / torch-fidelity)")
  parser.add_argument("--out", required=True, help="output .safetensors path")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace --out even if ldm_jax did not write it")
  args = parser.parse_args(argv)
  if not args.out.endswith(".safetensors"):
    parser.exit(1, f"error: --out must end in .safetensors, got {args.out!r}\n")
  try:
    tensors = convert(args.src, args.out, overwrite=args.overwrite)
  except (WeightFileError, StateMismatchError, outputs.OutputError, OSError) as e:  # input
    parser.exit(1, f"error: {e}\n")
  print(f"wrote {len(tensors)} tensors to {args.out}; set "
        f"config.eval.inception_weights={args.out}", file=sys.stderr)


if __name__ == "__main__":
  main()
