"""Inception statistics of a dataset split, computed once and reused for FID.

    python -m ldm_jax.eval.reference_stats --config=configs/kl_f8.py \
        --inception_weights=inception_fid.safetensors --out=val_stats.npz \
        [--split=validation] [--num_examples=N] [--config.data.source=folder ...]

or `--workdir=DIR` to take the data block of a run's saved config.json. Images are read as
evaluation reads them (center crop to data.image_size, no flip). The `.npz` holds `mu` and
`sigma` as pytorch-fid writes them (so either tool reads the other's), plus `num_examples`.
"""

from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

from ldm_jax import cli
from ldm_jax.eval.reference import compute_reference_stats
from ldm_jax.logs import console_logging

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file (its data block).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Or: a run whose config.json to use.")
_OUT = flags.DEFINE_string("out", None, "Output .npz.")
_INCEPTION = flags.DEFINE_string("inception_weights", None,
                                 "FID Inception safetensors; default config.eval's.")
_SPLIT = flags.DEFINE_string("split", None, "Data split; default config.data.val_split.")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 0, "Images to use; 0 = all.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch; default config.data.batch_size.")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False,
                                  "Replace --out even when ldm_jax did not write it.")
_VERBOSE = flags.DEFINE_boolean("verbose", False, cli.VERBOSE_HELP)
flags.mark_flags_as_required(["out"])


def main(argv):
  from ldm_jax.fs import configure_storage
  configure_storage()  # gs:// (and a GCS emulator) for every storage library: see ldm_jax.fs
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console_logging()
  if (_CONFIG.value is None) == (_WORKDIR.value is None):
    raise app.UsageError("give exactly one of --config or --workdir")
  from ldm_jax.data.spec import DataSpec
  from ldm_jax.eval.setup import eval_config
  try:
    if _WORKDIR.value:
      from ldm_jax.eval.workdir import load_run_config
      config = load_run_config(_WORKDIR.value)
    else:
      config = _CONFIG.value
    weights = _INCEPTION.value or eval_config(config).inception_weights
    data = DataSpec.from_config(config.data)
    compute_reference_stats(data, _SPLIT.value or data.val_split, weights,
                            os.fspath(_OUT.value), batch_size=_BATCH.value or data.batch_size,
                            num_examples=_NUM_EXAMPLES.value, overwrite=_OVERWRITE.value)
  except (FileNotFoundError, ValueError) as e:  # missing files, bad config: no traceback
    cli.fail(e, _VERBOSE.value)


if __name__ == "__main__":
  cli.run(main, _VERBOSE)  # errors the user can fix (--config.* keys too): one line
