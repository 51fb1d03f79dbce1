"""What the commands share: flag parsing, and errors a user caused as one line.

Every command runs through `run(main, verbose)`: an error the user caused (a bad flag or
config value, a missing or wrong file, data that cannot train) ends it with one line,
`error: <what>, <why>, <how to fix>`, and exit status 1, before anything is written where
possible. `--verbose` (each command defines it: library modules define no flags) or absl's
`-v 1` shows the traceback instead. A user error is an exception raised by ldm_jax's own
code as a ValueError or OSError, of a class ldm_jax defines, or absl's UsageError (which
absl would print below the whole --help): those carry a message written for the user. Anything raised inside a library (jax, orbax, grain) keeps its
traceback, since that is a bug to report rather than an input to fix.

ml_collections' config_flags turns an override of a key the config does not have into
three chained tracebacks ending in `AttributeError: "'foo'"`, and a config file that
raises (an unknown variant, `:dmeo`) into a traceback inside absl's flag error.
`parse_flags` explains both in one line, naming the block that lacks the key and listing
the keys it has; absl's own flag errors (a bad integer, a missing required flag) become
one line too.
"""

from __future__ import annotations

import difflib
import os
import re
from typing import Any, Callable, NoReturn

from absl import app, flags, logging

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
# What ldm_jax's own code raises for a bad input (see `is_user_error`).
USER_ERRORS = (ValueError, OSError)
VERBOSE_HELP = ("On an error, show its traceback (without it, an error you can fix is one "
                "line: `error: ...`); absl's -v 1 does the same.")


def run(main: Callable[[list[str]], Any], verbose: flags.FlagHolder) -> None:
  """`absl.app.run(main)` with `parse_flags`; a user error ends the command with one line
  (exit status 1), unless `verbose` (the command's --verbose flag) or -v 1 asks for the
  traceback."""
  def guarded(argv):
    try:
      return main(argv)
    except Exception as e:  # pylint: disable=broad-except  # re-raised unless the user's
      if verbose_requested(verbose.value) or not is_user_error(e):
        raise
      raise SystemExit(f"error: {one_line(e)}") from None
  app.run(guarded, flags_parser=parse_flags)


def fail(error: BaseException, verbose: bool = False) -> NoReturn:
  """For a command's own `except` around what it checks first: exits with the one line,
  or with --verbose (or -v 1) re-raises `error` with its traceback."""
  if verbose_requested(verbose):
    raise error
  raise SystemExit(f"error: {one_line(error)}") from None


def verbose_requested(verbose: bool = False) -> bool:
  """--verbose, or absl's logging verbosity at DEBUG (-v 1) or above."""
  return bool(verbose) or logging.get_verbosity() >= logging.DEBUG


def is_user_error(error: BaseException) -> bool:
  """Whether `error` says what the user should fix: a class ldm_jax defines (a workdir
  mismatch, a weight file of the wrong kind, a non-finite loss), or a ValueError /
  OSError raised by ldm_jax's code (its checks of configs, flags, paths and data)."""
  if type(error).__module__.split(".")[0] == "ldm_jax" or isinstance(error, app.UsageError):
    return True  # (absl would print the whole --help above a UsageError's message)
  return isinstance(error, USER_ERRORS) and _raised_in_package(error)


def _raised_in_package(error: BaseException) -> bool:
  tb = error.__traceback__
  if tb is None:
    return False
  while tb.tb_next is not None:
    tb = tb.tb_next
  filename = os.path.abspath(tb.tb_frame.f_code.co_filename)
  return filename.startswith(_PACKAGE + os.sep)


def one_line(error: BaseException | str) -> str:
  """The message on one line. Some messages list items on lines of their own (the keys a
  resume changed, the tensors that do not fit) or put a hint below: the lines are joined
  with "; ", or a space after a line that ends a sentence or opens a list."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  out = lines[:1]
  for line in lines[1:]:
    out.append((" " if out[-1][-1] in ".:;,(" else "; ") + line)
  return "".join(out)


def parse_flags(argv: list[str], flag_values: flags.FlagValues | None = None,
                name: str = "config") -> list[str]:
  """Parses `argv` as absl's default parser does; a flag that does not parse (an unknown
  or unloadable `--NAME` config, a bad value) exits with one `error: ...` line instead of
  a traceback, unless `--verbose` or `-v 1` is among `argv`."""
  values = flags.FLAGS if flag_values is None else flag_values
  try:
    rest = values(argv)
  except Exception as e:  # pylint: disable=broad-except  # config_flags raises whatever it hit
    if _verbose_argv(argv):
      raise
    message = config_error(argv, values, name)
    if message is None and isinstance(e, flags.Error):  # absl's own: already one sentence
      message = f"{one_line(e)} (--helpshort lists the flags)"
    if message is None:
      raise
    raise SystemExit(f"error: {message}") from None
  config = values[name].value if name in values else None
  try:  # a file that failed to load parses as a stand-in raising on first use
    _ = config is not None and config.keys
  except OSError as e:
    detail = str(e.__cause__ or e).strip().splitlines()[-1].strip()
    raise SystemExit(f"error: --{name}={_config_argument(argv, name)}: cannot load it: "
                     f"{detail}") from None
  return rest


def _verbose_argv(argv: list[str]) -> bool:
  """--verbose or -v / --verbosity >= 1 among the arguments (before they are parsed)."""
  for i, arg in enumerate(argv[1:], 1):
    if re.fullmatch(r"--verbose(=(true|1))?", arg, re.IGNORECASE):
      return True
    m = re.fullmatch(r"--?v(erbosity)?(=(-?\d+))?", arg)
    if m:
      level = m[3] if m[2] else (argv[i + 1] if i + 1 < len(argv) else "")
      if re.fullmatch(r"\d+", level or "") and int(level) >= 1:
        return True
  return False


def _config_argument(argv: list[str], name: str) -> str | None:
  for i, arg in enumerate(argv):
    m = re.fullmatch(rf"--?{name}(=(.*))?", arg)
    if m:
      return m[2] if m[1] else (argv[i + 1] if i + 1 < len(argv) else None)
  return None


def _overrides(argv: list[str], name: str) -> list[str]:
  return [m[2] for arg in argv if (m := re.match(rf"--?(no)?{name}\.([^=]+)", arg))]


def config_error(argv: list[str], flag_values: flags.FlagValues, name: str = "config"
                 ) -> str | None:
  """Why `--NAME` with its `--NAME.a.b=...` overrides in `argv` cannot parse, or None when
  the reason is none of: a config file that fails to load, an override of a missing key."""
  argv = flag_values.read_flags_from_files(list(argv[1:]), force_gnu=False)
  source = _config_argument(argv, name)
  if not source or name not in flag_values:
    return None
  try:
    config = flag_values[name].parser.parse(source)
  except Exception as e:  # pylint: disable=broad-except  # the config file's own error
    cause = _original(e)
    if isinstance(cause, ValueError):  # what the file checks (an unknown variant)
      return f"--{name}={source}: {one_line(cause)}"
    return f"--{name}={source}: {type(cause).__name__}: {one_line(cause)}"
  for path in _overrides(argv, name):
    message = unknown_key(config, path)
    if message is not None:
      return f"--{name}.{path}: {message}"
  return None


def _original(error: BaseException) -> BaseException:
  """The exception a chain started with: config_flags re-raises a config file's error as
  a new one of its type whose message holds the whole traceback."""
  while (error.__cause__ or error.__context__) is not None:
    error = error.__cause__ or error.__context__
  return error


def unknown_key(config: Any, path: str) -> str | None:
  """What is wrong with the dotted `path` into `config` (a ConfigDict), or None if it
  names an existing key."""
  node, parts = config, path.split(".")
  for i, part in enumerate(parts):
    block = ".".join(parts[:i])
    if "[" in part:  # config_path's indexing: not checked here
      return None
    if not hasattr(node, "keys"):
      return f"`{block}` is a value ({node!r}), not a block with keys"
    if part not in node:
      keys = sorted(node.keys())
      close = difflib.get_close_matches(part, keys, n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      if block:
        return f"the `{block}` block has no key {part!r}{hint}; its keys: {', '.join(keys)}"
      what = "block" if len(parts) > 1 else "key"
      return f"the config has no {what} {part!r}{hint}; its top-level keys: {', '.join(keys)}"
    node = node[part]
  return None
