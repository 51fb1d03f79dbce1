"""Console logging for the command-line tools: INFO from us, warnings from everyone."""

from __future__ import annotations

import contextlib
import errno
import logging as std_logging
import threading
import time
from typing import Iterator

from absl import logging


class _QuietLibraries:
  """Keeps library INFO chatter (orbax per save, clu per step, jax's TPU probe) out of the
  console; their warnings and errors still show."""

  NOISY = ("/orbax/", "/grain/", "/clu/", "/jax/_src/xla_bridge.py", "/asyncio/")

  def filter(self, record) -> bool:
    library = any(part in record.pathname for part in self.NOISY)
    if library and record.exc_info and (_muted or disk_full(record.exc_info[1])):
      # orbax logs each writer thread's failure with its traceback; the command's own
      # error line already names the step and the full disk.
      record.exc_info, record.exc_text = None, None
    return record.levelno >= std_logging.WARNING or not library


_muted = False


def mute_library_tracebacks() -> None:
  """From now on, library threads' failures log their message without a traceback, and
  uncaught ones in threads print nothing: the run is ending on an error of its own, one
  line that already says what happened (a full disk makes every orbax writer thread fail,
  and its event loops then fail again as they close)."""
  global _muted
  _muted = True
  threading.excepthook = lambda args: None


def console_logging() -> None:
  """INFO verbosity (DEBUG kept when -v 1 asked for it: the commands also show tracebacks
  then) with the libraries' chatter filtered. The filter sits on the absl handler itself:
  that handler forwards records through emit(), which skips the filters of the handler it
  forwards to."""
  logging.set_verbosity(max(logging.get_verbosity(), logging.INFO))
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())


def line_notes(*notes: str) -> str:
  """Notes to append to a console line (" | a | b"), the empty ones left out."""
  return "".join(f" | {note}" for note in notes if note)


def disk_full(e: BaseException | None) -> bool:
  """Whether `e` or an exception it was raised from is ENOSPC (tensorstore reports it as
  text inside a ValueError, TensorFlow as a ResourceExhaustedError)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


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
