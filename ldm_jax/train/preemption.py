"""SIGTERM as a request to checkpoint and stop, agreed on by every host.

Hosts agree without a barrier per step: every `every` steps (the same steps on every host,
since they count the same) they all-gather their flags, and all act on the first such
step after any host was signalled. A single process needs no agreement and checks every
step. Cloud TPU and SLURM give tens of seconds between SIGTERM and the kill, so `every`
times the step time must stay well under that.
"""

from __future__ import annotations

import logging
import signal

import jax
import numpy as np


class PreemptionFlag:
  """Set by SIGTERM; `requested(step)` is True on the step every host acts on."""

  def __init__(self, every: int = 10):
    if every < 1:
      raise ValueError(f"train.preemption_every={every} must be >= 1")
    self.every = int(every)
    self._flag = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint at the next agreed step and "
                    "exiting")
    self._flag = True

  def requested(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self._flag
    if step % self.every:
      return False
    from jax.experimental import multihost_utils
    return bool(multihost_utils.process_allgather(np.asarray(self._flag)).any())

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)
