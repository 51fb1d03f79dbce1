"""Console logging for the command-line tools: INFO from us, warnings from everyone."""

from __future__ import annotations

import logging as std_logging

from absl import logging


class _QuietLibraries:
  """Keeps library INFO chatter (orbax per save, clu per step, jax's TPU probe) out of the
  console; their warnings and errors still show."""

  NOISY = ("/orbax/", "/grain/", "/clu/", "/jax/_src/xla_bridge.py")

  def filter(self, record) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        part in record.pathname for part in self.NOISY)


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
