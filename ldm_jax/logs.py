"""Console logging for the command-line tools: INFO from us, warnings from everyone."""

from __future__ import annotations

import contextlib
import logging as std_logging
import time
from typing import Iterator

from absl import logging


class _QuietLibraries:
  """Keeps library INFO chatter (orbax per save, clu per step, jax's TPU probe) out of the
  console; their warnings and errors still show."""

  NOISY = ("/orbax/", "/grain/", "/clu/", "/jax/_src/xla_bridge.py")

  def filter(self, record) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        part in record.pathname for part in self.NOISY)


def console_logging() -> None:
  """INFO verbosity with the libraries' chatter filtered. The filter sits on the absl
  handler itself: that handler forwards records through emit(), which skips the filters
  of the handler it forwards to."""
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())


def line_notes(*notes: str) -> str:
  """Notes to append to a console line (" | a | b"), the empty ones left out."""
  return "".join(f" | {note}" for note in notes if note)


@contextlib.contextmanager
def compile_timer(what: str, first: bool = True) -> Iterator[None]:
  """Around a jitted program's first call (when `first`): logs "compiling WHAT", then
  "compiled WHAT in X s". That call returns once the program is compiled and dispatched
  (it runs asynchronously), so X is mostly compilation: minutes for a large model, in
  which the console would otherwise say nothing."""
  if not first:
    yield
    return
  logging.info("compiling %s", what)
  start = time.perf_counter()
  yield
  logging.info("compiled %s in %.1f s", what, time.perf_counter() - start)
