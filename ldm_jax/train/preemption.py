"""SIGTERM and Ctrl-C (SIGINT) as a request to checkpoint and stop, agreed on by every host.

The first signal asks the loop to save at the next step boundary and exit with one line
saying where it saved; a second SIGINT stops at once without saving (an asynchronous save
still in flight is then left as a temporary folder, which the next start removes: orbax
makes a checkpoint visible only once complete, so the previous one is never lost).

Hosts agree without a barrier per step: every `every` steps (the same steps on every host,
since they count the same) they all-gather their flags, and all act on the first such
step after any host was signalled. A single process needs no agreement and checks every
step. Cloud TPU and SLURM give tens of seconds between SIGTERM and the kill, so `every`
times the step time must stay well under that.
"""

from __future__ import annotations

import logging
import os
import signal

import jax
import numpy as np

# The exit status of a run stopped by Ctrl-C, as shells report a SIGINT'd process.
SIGINT_EXIT = 128 + signal.SIGINT


class PreemptionFlag:
  """Set by SIGTERM or SIGINT; `requested(step)` is True on the step every host acts on."""

  def __init__(self, every: int = 10):
    if every < 1:
      raise ValueError(f"train.preemption_every={every} must be >= 1")
    self.every = int(every)
    self.signal: int | None = None  # the first signal received
    self._previous = {s: signal.signal(s, self._handle)
                      for s in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, frame):
    if self.signal is not None and signum == signal.SIGINT:
      logging.warning("second interrupt: stopping now without saving; the last complete "
                      "checkpoint is kept, and rerunning the command resumes from it")
      logging.shutdown()
      os._exit(SIGINT_EXIT)  # at once: no waiting on threads or an in-flight save
    if self.signal is None:
      self.signal = signum
      again = " (Ctrl-C again stops at once, without saving)" if signum == signal.SIGINT else ""
      logging.warning("%s received: saving a checkpoint at the next step and exiting%s",
                      signal.Signals(signum).name, again)

  def requested(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.signal is not None
    if step % self.every:
      return False
    from jax.experimental import multihost_utils
    return bool(multihost_utils.process_allgather(np.asarray(self.signal is not None)).any())

  def restore(self):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
