"""Entry point: `python -m ldm_jax.main --config=configs/kl_f8.py --workdir=DIR`.

Run the same command on every host of a TPU pod or GPU cluster: multi-host runs are
detected from the environment (Cloud TPU, SLURM) or set with the --coordinator_address,
--num_processes and --process_id flags (see launch/).
"""

from __future__ import annotations

import os
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ldm_jax import cli
from ldm_jax.logs import console_logging

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file, e.g. configs/kl_f8.py or configs/kl_f8.py:demo.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs, images and exports.")
_MODE = flags.DEFINE_enum("mode", "train", ["train"], "What to run.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_VERBOSE = flags.DEFINE_boolean("verbose", False, cli.VERBOSE_HELP)
flags.mark_flags_as_required(["config", "workdir"])


def _cluster_environment() -> bool:
  """True where jax.distributed.initialize() can find its peers by itself."""
  if os.environ.get("SLURM_NTASKS", "1") not in ("", "1"):
    return True
  return bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))


def initialize_distributed() -> None:
  import jax
  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif _cluster_environment():
    jax.distributed.initialize()


def main(argv):
  from ldm_jax.fs import configure_storage
  configure_storage()  # gs:// (and a GCS emulator) for every storage library: see ldm_jax.fs
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console_logging()
  initialize_distributed()
  import jax
  logging.info("process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  if _CONFIG.value.get("stage") == "ldm":
    from ldm_jax.train.ldm_trainer import train_and_evaluate
  else:
    from ldm_jax.train.autoencoder_trainer import train_and_evaluate
  from ldm_jax.logs import disk_full
  from ldm_jax.train.checkpoint import CheckpointWriteError
  from ldm_jax.train.loop import RunStopped
  from ldm_jax.train.preemption import SIGINT_EXIT
  # A config, data or weights error, a workdir of another run or one held by a live run, a
  # non-finite loss: one `error:` line (cli.run), each checked before the workdir is made
  # where it can be. What is handled here is what cli.run cannot end the usual way.
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except RunStopped as e:  # SIGTERM or Ctrl-C: saved; the run's one closing line
    logging.warning("%s", e)
    if e.signal == signal.SIGINT:
      sys.exit(SIGINT_EXIT)
  except KeyboardInterrupt:  # Ctrl-C before the first step: there was nothing to save
    logging.warning("interrupted before training started: nothing was saved")
    sys.exit(SIGINT_EXIT)
  except Exception as e:  # pylint: disable=broad-except
    if isinstance(e, CheckpointWriteError):
      message = str(e)
    elif disk_full(e):  # the metrics writer, an image, the export: not a checkpoint
      message = (f"no space left on device under {_WORKDIR.value}; free space and rerun the "
                 f"same command to resume from the last complete checkpoint")
    else:
      raise
    if _VERBOSE.value:
      raise
    # orbax's writer threads may still hold failing writes: exiting normally would wait on
    # them and print their tracebacks at interpreter shutdown.
    print(f"error: {message}", file=sys.stderr, flush=True)
    logging.flush()
    os._exit(1)


if __name__ == "__main__":
  cli.run(main, _VERBOSE)  # errors the user can fix: one line; --verbose: the traceback
