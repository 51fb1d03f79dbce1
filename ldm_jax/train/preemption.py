"""SIGTERM as a request to checkpoint and stop, agreed on by every host."""

from __future__ import annotations

import logging
import signal

import jax
import numpy as np


class PreemptionFlag:
  """Set by SIGTERM; every host agrees on it before acting."""

  def __init__(self):
    self._flag = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint at the current step and exiting")
    self._flag = True

  def requested(self) -> bool:
    if jax.process_count() == 1:
      return self._flag
    from jax.experimental import multihost_utils
    return bool(multihost_utils.process_allgather(np.asarray(self._flag)).any())

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)
